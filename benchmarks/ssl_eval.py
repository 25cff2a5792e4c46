"""SSL evaluation cost against the work it cannot avoid, side by side in one run.

**(1) kNN evaluation throughput.** ``narrows.ssl.knn_eval.evaluate_knn`` without a cache
(features in memory) on a random-weight 2-token ViT: (train + test images) / wall time of the
whole call — both feature passes (loader, normalisation, the one forward per image through
``token_parts``, copy to the CPU), the weighted-kNN search for every feature and k, the result
— divided by the images/s of the bare backbone: ``vit.forward_features`` (patch embedding,
blocks, final norm: the same forward ``token_parts`` runs for one last block) on the same train
and test images, through the same loader (``narrows.data.streaming.stream_dataset``, same batch
size and workers), on the same device, under ``no_grad`` in eval mode, output discarded, no
normalisation (so every extra of ``evaluate_knn`` counts against it). Features: the default
four (``cls``, ``cls+``, ``cls|cls+``, ``avgpool``) with k 10/20/100/200 unless ``--features`` /
``--k`` say otherwise. Target ≥ 0.9.

**(2) Linear probe, 100 epochs, augment none.** ``narrows.ssl.linear.linear_probe`` on cached
features (a fresh feature-store directory per repetition, so its one pass over each split and
the disk writes are timed) against the same probe with ``through_backbone=True`` (the frozen
backbone on the training images every epoch); wall time of each whole call, same seed and
options. Target ≥ 20× faster with the same top-1 (|Δ| in points; expected 0). A smaller ViT
and data than (1) so that the through-backbone side takes minutes on 2 CPU cores.

Each part: one untimed warm-up of each side (for (2) a 1-epoch probe of each), then
interleaved repetitions, alternating which side goes first; medians. The data sets are built
before timing (not timed). ``--threads`` (default 2) sets torch's intra-op threads: more
threads than idle cores makes every small op wait for a descheduled thread (tens of ms), so
measure on an otherwise idle machine. ``--device cuda`` works too (synchronised before each
clock read).

    python benchmarks/ssl_eval.py [--threads 2] [--repeats 3] [--linear-repeats 1]
        [--device cpu|cuda] [--knn-model vit_small_patch16_224] [--knn-data shapes:size=64,...]
        [--linear-model vit_tiny_patch16_224 --linear-model-kwargs depth=4,patch_size=8]
        [--linear-data shapes:size=32,...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from narrows.runtime import set_threads

KNN_DATA = "shapes:size=64,train=2000,test=500"
LINEAR_DATA = "shapes:size=32,train=500,test=200"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _interleaved(sides: dict[str, Callable[[], object]], repeats: int,
                 device: torch.device) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds of each side per repetition (rotating which goes first) and its last output."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, object] = {}
    names = list(sides)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, outputs[name] = _timed(sides[name], device)
            times[name].append(seconds)
    return times, outputs


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (feature specs contain '|')."""
    return text.replace("|", "\\|")


def _model_text(model: str, kwargs: str | None) -> str:
    return f"{model}({kwargs})" if kwargs else model


def _backbone(model: str, kwargs: str | None, size: int, class_tokens: int):
    from narrows.ssl.backbones import load_eval_backbone

    return load_eval_backbone(model=model, model_kwargs=kwargs, class_tokens=class_tokens,
                              seed=0, image_size=size)


def knn_part(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from narrows.data import load
    from narrows.data.streaming import Streaming, stream_dataset
    from narrows.ssl.eval_options import KNNOptions
    from narrows.ssl.knn_eval import evaluate_knn

    data = load(args.knn_data)
    size = int(data.info.image_size)
    backbone = _backbone(args.knn_model, args.knn_model_kwargs, size, args.class_tokens)
    vit = backbone.vit.to(device).eval()
    options = KNNOptions(features=list(args.features), k=list(args.k))
    splits = [data.split("train", "none"), data.split("test", "none")]
    images = sum(len(s) for s in splits)
    how = Streaming(device=device, batch_size=args.batch_size, workers=args.workers,
                    progress=False, say=None)

    class _Nothing:
        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    @torch.no_grad()
    def forward(x: torch.Tensor, _labels: torch.Tensor) -> None:
        vit.forward_features(x)

    def bare() -> int:
        return sum(stream_dataset(s, forward, _Nothing(), how, desc="forward") for s in splits)

    def knn():
        return evaluate_knn(backbone, data, options, cache=None, device=device, say=None,
                            batch_size=args.batch_size, workers=args.workers)

    sides = {"bare forward_features": bare, "evaluate_knn": knn}
    for fn in sides.values():
        _timed(fn, device)  # warm-up
    times, outputs = _interleaved(sides, args.repeats, device)
    result = outputs["evaluate_knn"]
    assert outputs["bare forward_features"] == images
    assert all(r["n_train"] + r["n_test"] == images for r in result.rows)
    med = {name: statistics.median(v) for name, v in times.items()}
    rate = {name: images / s for name, s in med.items()}
    ratio = rate["evaluate_knn"] / rate["bare forward_features"]
    print(f"(1) kNN: {backbone.describe()}, {args.knn_model_kwargs or 'timm defaults'}; "
          f"{data.info.spec}: {images} images; batch {args.batch_size}, workers {args.workers}; "
          f"features {', '.join(result.features)}; k {', '.join(map(str, result.ks))}; "
          f"{args.repeats} interleaved repetitions")
    for name in sides:
        print(f"  {name:<22} median {med[name]:8.2f} s  {rate[name]:9.1f} images/s  "
              f"(all: {', '.join(f'{t:.2f}' for t in times[name])} s)")
    parts = result.seconds
    print(f"  evaluate_knn's last call: features {parts['features']:.2f} s, "
          f"kNN {parts['knn']:.2f} s, total {parts['total']:.2f} s")
    print(f"  kNN images/s ÷ bare forward images/s: {ratio:.3f}   (target ≥ 0.9)", flush=True)
    return {"knn_rate": rate["evaluate_knn"], "bare_rate": rate["bare forward_features"],
            "ratio": ratio, "images": images,
            "setting": f"{_model_text(args.knn_model, args.knn_model_kwargs)}, {data.info.spec}, "
                       f"features {' '.join(result.features)}, k {' '.join(map(str, result.ks))}, "
                       f"batch {args.batch_size}"}


def linear_part(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from narrows.data import load
    from narrows.ssl.eval_options import LinearOptions
    from narrows.ssl.linear import linear_probe

    data = load(args.linear_data)
    size = int(data.info.image_size)
    backbone = _backbone(args.linear_model, args.linear_model_kwargs, size, args.class_tokens)
    common = dict(feature=args.linear_feature, lr=list(args.linear_lr),
                  batch_size=args.linear_batch_size, augment="none")

    def probe(epochs: int, through: bool) -> Callable[[], object]:
        options = LinearOptions(epochs=epochs, through_backbone=through, **common)

        def run():
            with tempfile.TemporaryDirectory() as cache:
                return linear_probe(backbone, data, options, cache=None if through else cache,
                                    device=device, batch_size=args.batch_size,
                                    workers=args.workers, seed=0, say=None)
        return run

    for through in (False, True):
        _timed(probe(1, through), device)  # warm-up: a 1-epoch probe of each side
    sides = {"cached": probe(args.epochs, False), "through backbone": probe(args.epochs, True)}
    times, outputs = _interleaved(sides, args.linear_repeats, device)
    med = {name: statistics.median(v) for name, v in times.items()}
    top1 = {name: 100 * float(outputs[name].best_top1) for name in sides}
    passes = {name: int(outputs[name].backbone_passes) for name in sides}
    speedup = med["through backbone"] / med["cached"]
    delta = abs(top1["cached"] - top1["through backbone"])
    print(f"(2) linear probe: {backbone.describe()}, {args.linear_model_kwargs or 'timm defaults'}"
          f"; {data.info.spec}; feature {args.linear_feature}, lr {args.linear_lr}, "
          f"{args.epochs} epochs, head batch {args.linear_batch_size}, augment none; "
          f"{args.linear_repeats} interleaved repetitions")
    for name in sides:
        print(f"  {name:<17} median {med[name]:8.2f} s  top-1 {top1[name]:6.2f} %  "
              f"backbone passes over train {passes[name]}  "
              f"(all: {', '.join(f'{t:.2f}' for t in times[name])} s)")
    print(f"  speed-up of the cached probe: {speedup:.1f}×   (target ≥ 20×); "
          f"|Δ top-1| {delta:.2f} points (expected 0)", flush=True)
    return {"cached_s": med["cached"], "through_s": med["through backbone"],
            "speedup": speedup, "top1_cached": top1["cached"],
            "top1_through": top1["through backbone"], "delta": delta,
            "setting": f"{_model_text(args.linear_model, args.linear_model_kwargs)}, "
                       f"{data.info.spec}, {args.linear_feature}, lr "
                       f"{' '.join(f'{lr:g}' for lr in args.linear_lr)}, augment none"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of (1)")
    parser.add_argument("--linear-repeats", type=int, default=1, help="repetitions of (2)")
    parser.add_argument("--parts", nargs="+", choices=("knn", "linear"),
                        default=["knn", "linear"])
    parser.add_argument("--batch-size", type=int, default=256, help="images per feature pass")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--class-tokens", type=int, choices=(1, 2), default=2)
    parser.add_argument("--knn-model", default="vit_small_patch16_224")
    parser.add_argument("--knn-model-kwargs", default=None, help="e.g. depth=6")
    parser.add_argument("--knn-data", default=KNN_DATA, help="its size is the ViT's img_size")
    parser.add_argument("--features", nargs="+", default=["cls", "cls+", "cls|cls+", "avgpool"])
    parser.add_argument("--k", nargs="+", type=int, default=[10, 20, 100, 200])
    parser.add_argument("--linear-model", default="vit_tiny_patch16_224")
    parser.add_argument("--linear-model-kwargs", default="depth=4,patch_size=8")
    parser.add_argument("--linear-data", default=LINEAR_DATA)
    parser.add_argument("--linear-feature", default="cls@4")
    parser.add_argument("--linear-lr", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    parser.add_argument("--linear-batch-size", type=int, default=256, help="heads' batch")
    parser.add_argument("--epochs", type=int, default=100,
                        help="linear-probe epochs (the issue's figure is for 100)")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {threads} threads")
    knn = linear = None
    if "knn" in args.parts:
        knn = knn_part(args, device)
    if "linear" in args.parts:
        linear = linear_part(args, device)
    where = f"{device}, {threads} threads"
    print("\n| measurement | setting | narrows | reference | ratio | target |")
    print("|---|---|---:|---:|---:|---|")
    if knn is not None:
        print(f"| kNN evaluation images/s ÷ bare forward images/s | "
              f"{_cell(knn['setting'])}; {where} | "
              f"{knn['knn_rate']:.1f} images/s | {knn['bare_rate']:.1f} images/s | "
              f"{knn['ratio']:.3f} | ≥ 0.9 |")
    if linear is not None:
        print(f"| linear probe, {args.epochs} epochs: cached vs through the backbone | "
              f"{_cell(linear['setting'])}; {where} | {linear['cached_s']:.1f} s, top-1 "
              f"{linear['top1_cached']:.2f} % | {linear['through_s']:.1f} s, top-1 "
              f"{linear['top1_through']:.2f} % | {linear['speedup']:.1f}× faster, "
              f"\\|Δ top-1\\| {linear['delta']:.2f} pt | ≥ 20×, same top-1 |")


if __name__ == "__main__":
    main()
