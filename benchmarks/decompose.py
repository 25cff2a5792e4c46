"""Extraction throughput against the bare backbone, and its peak memory against the data size.

Throughput, two comparisons on the same batches, interleaved, several repetitions each after a
warm-up, ratio of medians and of best (least disturbed) times printed. Target ≥ 0.9.

* **end to end**: ``narrows.decompose.extract.count`` (the pass ``extract`` runs: DataLoader
  over an in-memory uint8 data set, normalisation, pooled features, histogram update) against
  a bare loop over the same DataLoader that normalises and runs the backbone to its pooled
  features, and nothing else;
* **paired per batch**: on pre-made input batches, ``features(x)`` + ``TopKHistogram.update``
  against ``features(x)`` alone, the two back to back on every batch (alternating which goes
  first), which cancels most of the drift of a shared, loaded machine.

The histogram counts the default curve grid of per-image k (1, 2, 3, 4, 5, 8, ... up to D)
and the three Ψ thresholds, as ``narrows decompose extract`` does.

Memory: ``extract`` over N synthetic 32×32 images generated on the fly (nothing held), in a
fresh process per N; the peak resident set size (``VmHWM``) is printed for each N. The
histogram state is ``C·D·len(ks) + C·T·(D+1)`` integers whatever N.

    python benchmarks/decompose.py [--model resnet20_cifar] [--size 32] [--batch 256]
        [--images 2048] [--repeats 5] [--memory 10000 50000] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import timm
import torch
from torch.utils.data import DataLoader, Dataset

import narrows.models  # noqa: F401  (registers resnet20_cifar with timm)
from narrows.data import TensorImageDataset
from narrows.data.streaming import Streaming
from narrows.decompose import TopKHistogram, curve_ks, extract, split_head
from narrows.decompose.extract import DEFAULT_THRESHOLDS, count
from narrows.runtime import set_threads
from narrows.training import Normalizer

CLASSES = 10


class Synthetic(Dataset):
    """N random images in [0, 1], each made from its index when asked for (nothing stored)."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(index)
        return torch.rand(3, self.size, self.size, generator=gen), index % CLASSES


def build(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=CLASSES).eval().to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(args: argparse.Namespace, device: torch.device) -> None:
    model = build(args.model, device)
    features, linear = split_head(model)
    width = linear.in_features
    norm = Normalizer((0.5,) * 3, (0.25,) * 3)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=gen,
                           dtype=torch.uint8)
    data = TensorImageDataset(images, torch.arange(args.images) % CLASSES)
    ks = curve_ks(width)

    def new_hist() -> TopKHistogram:
        return TopKHistogram(CLASSES, width, ks, k_mass=5, thresholds=DEFAULT_THRESHOLDS,
                             device=device)

    @torch.no_grad()
    def bare_loop() -> float:
        start = time.perf_counter()
        for x, _ in DataLoader(data, batch_size=args.batch, shuffle=False):
            features(norm(x.to(device)))
        sync(device)
        return time.perf_counter() - start

    def ours_loop() -> float:
        start = time.perf_counter()
        count(model, features, data, new_hist(), norm,
              Streaming(device=device, batch_size=args.batch, progress=False))
        sync(device)
        return time.perf_counter() - start

    batches = [norm(torch.rand(args.batch, 3, args.size, args.size, generator=gen)).to(device)
               for _ in range(max(1, args.images // args.batch))]
    labels = (torch.arange(args.batch) % CLASSES).to(device)

    @torch.no_grad()
    def paired() -> tuple[list[float], list[float]]:
        """Per batch, bare and extraction back to back (alternating which goes first)."""
        hist = new_hist()
        bare_t, ours_t = [], []
        for rep in range(args.repeats):
            for i, x in enumerate(batches):
                for counted in ((False, True) if (i + rep) % 2 == 0 else (True, False)):
                    start = time.perf_counter()
                    h = features(x)
                    if counted:
                        hist.update(h, labels)
                    sync(device)
                    (ours_t if counted else bare_t).append(time.perf_counter() - start)
        return bare_t, ours_t

    print(f"{args.model} at {args.size}×{args.size}, batch {args.batch}, D = {width}, "
          f"{len(ks)} per-image k counted, {len(DEFAULT_THRESHOLDS)} Ψ thresholds, "
          f"{device}, {torch.get_num_threads()} threads")
    bare_loop(), ours_loop()  # warm-up
    b_times, o_times = [], []
    for _ in range(args.repeats):
        b_times.append(bare_loop())
        o_times.append(ours_loop())
    b_med, o_med = statistics.median(b_times), statistics.median(o_times)
    n = args.images
    print(f"end to end (DataLoader, {n} images, {args.repeats} passes each): bare "
          f"{n / min(b_times):,.0f} / {n / b_med:,.0f} img/s (best / median), extraction "
          f"{n / min(o_times):,.0f} / {n / o_med:,.0f} img/s; ratio of best "
          f"{min(b_times) / min(o_times):.3f}, ratio of medians {b_med / o_med:.3f} "
          f"(target ≥ 0.9)")
    bare_t, ours_t = paired()
    b_med, o_med = statistics.median(bare_t), statistics.median(ours_t)
    print(f"paired per batch ({len(bare_t)} pairs): bare {args.batch / b_med:,.0f} img/s, "
          f"extraction {args.batch / o_med:,.0f} img/s (medians); ratio of medians "
          f"{b_med / o_med:.3f}, ratio of totals {sum(bare_t) / sum(ours_t):.3f} "
          f"(target ≥ 0.9)")


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM`` from /proc), in MiB.

    Not ``ru_maxrss``: Linux keeps it across fork and exec, so a child would report its
    parent's peak whenever that is higher.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(n: int, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    model = build(args.model, device)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3)
    start = time.perf_counter()
    ex = extract(model, Synthetic(n, args.size), num_classes=CLASSES, k=5,
                 ks=curve_ks(split_head(model)[1].in_features), normalizer=norm, device=device,
                 batch_size=args.batch, progress=False)
    seconds = time.perf_counter() - start
    state = ex.buckets.numel() + ex.below.numel() + 3 * CLASSES
    peak = peak_rss_mib()
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"images": int(ex.images.sum()), "seconds": seconds, "peak_rss_mib": peak,
                      "peak_gpu_mib": gpu, "state_integers": state}))


def memory(args: argparse.Namespace) -> None:
    rows = []
    for n in args.memory:
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--model", args.model,
               "--size", str(args.size), "--batch", str(args.batch), "--device", args.device,
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        row = rows[-1]
        gpu = f", peak GPU {row['peak_gpu_mib']:.1f} MiB" if row["peak_gpu_mib"] else ""
        print(f"extract over {row['images']:,} images of {args.size}×{args.size}: peak RSS "
              f"{row['peak_rss_mib']:.1f} MiB{gpu}, histogram state {row['state_integers']:,} "
              f"integers, {row['seconds']:.0f} s ({row['images'] / row['seconds']:,.0f} img/s)")
    if len(rows) > 1:
        print(f"peak RSS, largest / smallest N: "
              f"{rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=2048, help="images per throughput pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", type=int, nargs="*", default=[10_000, 50_000],
                        help="data-set sizes of the memory check (none: skip it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args.memory_child, args)
        return
    throughput(args, torch.device(args.device))
    if args.memory:
        memory(args)


if __name__ == "__main__":
    main()
