"""Training-step time of narrows' key-value bottleneck against the PyPI package
``discrete-key-value-bottleneck-pytorch``, and the peak memory of one step.

One training step, at the same sizes on the same embeddings, measured side by side in one run
(interleaved repetitions after a warm-up, rotating which side goes first; ratio of medians):

* **package**: ``DiscreteKeyValueBottleneck(dim=k, num_memories=J, dim_embed=D,
  num_memory_codebooks=C, dim_memory=V, codebook_dim=k)`` (``codebook_dim=k`` gives each head
  k-dimensional keys, not k·C; otherwise the package inserts an untrained projection), its
  projection and keys copied from narrows' layer (so both fetch the same pairs: checked and
  printed), keys frozen by putting its ``vq`` in eval mode; step = forward (search over every key
  of every head) + mean over heads + cross-entropy (label smoothing 0.1) + backward + gradient
  clipping (1.0) + SGD (lr 0.3) on the values;
* **narrows, search every step**: ``KeyValueBottleneck`` in training mode (projection, exact
  chunked search, usage counting, the voting decoder) and the same loss, clipping and SGD;
* **narrows, cached indices**: ``train_values`` on indices cached once after the keys froze
  (the search is not repeated: the keys never move again), as ``narrows kvb train`` runs it
  (``sparse=True``: only the fetched value rows are updated); ``sparse=False`` (dense autograd
  step) is timed too. Time per step = time of ``--cached-steps`` steps / their number.

Targets: narrows / package ≤ 0.2 with cached indices, ≤ 0.5 without.

Memory: each side's one step in a fresh process (build, one step), peak resident set size
(``VmHWM``) and the RSS just before the step; target ≤ 1.5 GB for narrows at the README
configuration. The package's README-size step needs about 11 GB (``--memory-sides`` to skip it).

    python benchmarks/kvb.py [--configs readme small] [--threads 2] [--repeats N]
        [--cached-steps 20] [--memory-sides narrows-search narrows-cached package]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

PACKAGE = "discrete-key-value-bottleneck-pytorch"
MODULE = "discrete_key_value_bottleneck_pytorch"


@dataclass(frozen=True)
class Config:
    name: str
    dim_embed: int  # D
    books: int  # C
    pairs: int  # J
    dim_key: int  # k
    dim_value: int  # V = classes
    batch: int  # B
    repeats: int  # timed repetitions (after one warm-up)


CONFIGS = {
    "readme": Config("readme", 2048, 256, 4096, 14, 10, 256, repeats=2),
    "small": Config("small", 2048, 32, 512, 14, 10, 256, repeats=10),
}
SIDES = ("package", "narrows-search", "narrows-cached", "narrows-cached-dense")
LR, CLIP, SMOOTHING = 0.3, 1.0, 0.1


def describe(cfg: Config) -> str:
    return (f"{cfg.name}: C {cfg.books} books × J {cfg.pairs:,} pairs, key dim {cfg.dim_key}, "
            f"value dim {cfg.dim_value}, batch {cfg.batch}, D {cfg.dim_embed}")


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """Both implementations at one configuration, with the step of each side."""

    def __init__(self, cfg: Config, device, cached_steps: int, sides: tuple[str, ...] = SIDES):
        import torch

        from narrows.kvb import KeyValueBottleneck, cache_indices

        self.cfg, self.device, self.cached_steps = cfg, device, cached_steps
        gen = torch.Generator().manual_seed(0)
        self.z = torch.randn(cfg.batch, cfg.dim_embed, generator=gen).to(device)
        self.y = torch.randint(0, cfg.dim_value, (cfg.batch,), generator=gen).to(device)
        self.layer = KeyValueBottleneck(cfg.dim_embed, cfg.books, cfg.pairs, cfg.dim_key,
                                        cfg.dim_value, seed=0).to(device)
        self.layer.freeze()  # random N(0, 1) keys: the step's cost does not depend on them
        self.opt = torch.optim.SGD([self.layer.values], lr=LR)
        self.package = None
        if "package" in sides:
            self.package = self._package()
        if any(s.startswith("narrows-cached") for s in sides):
            # cached_steps batches of distinct embeddings, searched once, as training does
            z = torch.randn(cached_steps * cfg.batch, cfg.dim_embed, generator=gen)
            self.cache = cache_indices(self.layer, z.to(device), batch_size=cfg.batch)
            self.cache_labels = torch.randint(0, cfg.dim_value, (len(z),), generator=gen)

    def _package(self):
        import torch
        from discrete_key_value_bottleneck_pytorch import DiscreteKeyValueBottleneck

        cfg = self.cfg
        ref = DiscreteKeyValueBottleneck(cfg.dim_key, num_memories=cfg.pairs,
                                         dim_embed=cfg.dim_embed, num_memory_codebooks=cfg.books,
                                         dim_memory=cfg.dim_value, codebook_dim=cfg.dim_key,
                                         decay=0.95).to(self.device)
        with torch.no_grad():
            ref.rand_proj.copy_(self.layer.projection)
            ref.vq._codebook.embed.copy_(self.layer.keys)
        ref.train()
        ref.vq.eval()  # frozen keys: no EMA update of the codebook
        self.ref_opt = torch.optim.SGD([ref.values], lr=LR)
        return ref

    def agreement(self) -> float:
        """Fraction of (sample, head) fetches on which the package and narrows agree."""
        import torch

        with torch.no_grad():
            _, (_, ref_idx, _) = self.package(self.z[:, None], return_intermediates=True)
            ours = self.layer.indices(self.z)[:, 0, :, 0]
        return float((ref_idx.reshape(ours.shape) == ours).float().mean())

    # -- one unit of work per side; returns the number of training steps it took -----------
    def package_step(self) -> int:
        import torch
        import torch.nn.functional as F

        self.ref_opt.zero_grad(set_to_none=True)
        logits = self.package(self.z[:, None])[:, 0]  # (B, 1, V) → (B, V)
        F.cross_entropy(logits, self.y, label_smoothing=SMOOTHING).backward()
        torch.nn.utils.clip_grad_norm_([self.package.values], CLIP)
        self.ref_opt.step()
        return 1

    def search_step(self) -> int:
        import torch
        import torch.nn.functional as F

        self.layer.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.layer(self.z), self.y, label_smoothing=SMOOTHING).backward()
        torch.nn.utils.clip_grad_norm_([self.layer.values], CLIP)
        self.opt.step()
        return 1

    def cached_steps_run(self, sparse: bool, steps: int | None = None) -> int:
        from narrows.kvb import train_values

        n = (steps or self.cached_steps) * self.cfg.batch
        stats = train_values(self.layer, self.cache[:n], self.cache_labels[:n], epochs=1, lr=LR,
                             batch_size=self.cfg.batch, label_smoothing=SMOOTHING, clip=CLIP,
                             shuffle=False, sparse=sparse)
        return stats.steps

    def run(self, side: str, steps: int | None = None) -> int:
        if side == "package":
            return self.package_step()
        if side == "narrows-search":
            return self.search_step()
        return self.cached_steps_run(side == "narrows-cached", steps)


def timing(cfg: Config, device, cached_steps: int, repeats: int | None) -> dict[str, float]:
    bench = Bench(cfg, device, cached_steps)
    print(f"\n{describe(cfg)}; {repeats or cfg.repeats} timed repetitions after a warm-up")
    print(f"  fetched pairs equal in both implementations: {100 * bench.agreement():.2f} %")
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for rep in range(1 + (repeats or cfg.repeats)):
        order = SIDES[rep % len(SIDES):] + SIDES[:rep % len(SIDES)]
        for side in order:
            sync(device)
            start = time.perf_counter()
            steps = bench.run(side)
            sync(device)
            if rep:  # the first round is the warm-up
                times[side].append((time.perf_counter() - start) / steps)
    med = {side: statistics.median(v) for side, v in times.items()}
    best = {side: min(v) for side, v in times.items()}
    for side in SIDES:
        print(f"  {side:<21} {1e3 * med[side]:>10.2f} ms/step (median), "
              f"{1e3 * best[side]:>10.2f} best")
    for side, target in (("narrows-cached", 0.2), ("narrows-cached-dense", 0.2),
                         ("narrows-search", 0.5)):
        print(f"  {side} / package: {med[side] / med['package']:.4f} (medians), "
              f"{best[side] / best['package']:.4f} (best)   target ≤ {target}")
    return med


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``), from /proc.

    ``ru_maxrss`` is not used: Linux keeps it across fork and exec, so a child started by a
    parent that once held 11 GB would report 11 GB too.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(config: str, side: str, device_name: str) -> None:
    import torch

    device = torch.device(device_name)
    bench = Bench(CONFIGS[config], device, cached_steps=1, sides=(side,))
    before = rss_mib()
    start = time.perf_counter()
    bench.run(side, steps=1)
    sync(device)
    seconds = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"peak_rss_mib": peak, "rss_before_step_mib": before, "seconds": seconds,
                      "peak_gpu_mib": gpu}))


def memory(config: str, sides: list[str], args: argparse.Namespace) -> None:
    print(f"\npeak memory of one training step, fresh process each ({describe(CONFIGS[config])})")
    for side in sides:
        cmd = [sys.executable, __file__, "--memory-child", config, side,
               "--device", args.device, "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  {side}: failed ({done.stderr.strip().splitlines()[-1:]})")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        gpu = f", peak GPU {row['peak_gpu_mib']:.0f} MiB" if row["peak_gpu_mib"] else ""
        target = "   target ≤ 1536 MiB" if side.startswith("narrows") else ""
        print(f"  {side:<21} peak RSS {row['peak_rss_mib']:>8.0f} MiB (before the step "
              f"{row['rss_before_step_mib']:.0f} MiB; step {row['seconds']:.2f} s){gpu}{target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=["small", "readme"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions [default: 10 small, 2 readme]")
    parser.add_argument("--cached-steps", type=int, default=20,
                        help="steps per timed unit of the cached sides")
    parser.add_argument("--memory-sides", nargs="*", default=["narrows-search", "narrows-cached",
                                                              "package"],
                        choices=SIDES, help="sides whose one-step peak memory is measured at the "
                        "README configuration (none: skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if importlib.util.find_spec(MODULE) is None:
        print(f"benchmarks/kvb.py compares narrows with the PyPI package '{PACKAGE}', which is "
              f"not installed: pip install {PACKAGE}  (or: pip install -e '.[bench]')")
        sys.exit(2)
    import torch

    from narrows.runtime import set_threads

    set_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.device)
        return
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads")
    for name in args.configs:
        timing(CONFIGS[name], torch.device(args.device), args.cached_steps, args.repeats)
    if args.memory_sides:
        memory("readme", args.memory_sides, args)


if __name__ == "__main__":
    main()
