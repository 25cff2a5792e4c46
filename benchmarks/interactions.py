"""Masked-forward throughput of the interaction estimator against the bare model, side by side.

ours: ``estimate_image`` with the model's value function on one 32×32 image, grid 16:
sampling pairs and contexts, building the row masks, expanding them to pixels, masking,
the forward pass, the reward, Δv. Rate = forward passes / wall time.
bare: the model's forward alone on pre-built masked inputs of the same batch size, the same
number of inputs. Many short interleaved repetitions; the ratio of the best rates (the least
disturbed repetition of each, robust on a shared machine) and of the medians. Target >= 0.95.

Also printed: the forward passes the exact shortcuts save, and the disk written per image
against the upstream layout (spec §4.1), for the paper-cifar and fork-imagenet presets.

    python benchmarks/interactions.py [--model resnet20_cifar] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch

from narrows.interactions.estimator import estimate_image, planned_forwards, upstream_forwards
from narrows.interactions.model_value import ModelValue
from narrows.interactions.players import PlayerGrid
from narrows.interactions.presets import PRESETS
from narrows.interactions.sampling import order_of
from narrows.models import create
from narrows.runtime import set_threads


def upstream_bytes(preset: dict, classes: int) -> int:
    """Per image upstream: float32 logits of every row, int64 contexts, float64 Δv (§4.1)."""
    n = preset["grid"] ** 2
    ratios, p, k = preset["ratios"], preset["pairs"], preset["contexts"]
    logits = len(ratios) * p * 4 * k * classes * 4
    contexts = p * k * sum(order_of(n, r) for r in ratios) * 8
    dv = len(ratios) * p * k * 8
    return logits + contexts + dv


def our_bytes(preset: dict) -> int:
    """Per image here: the npz of float32 Δv and int16 pairs, measured."""
    dv = np.zeros((len(preset["ratios"]), preset["pairs"], preset["contexts"]), np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, dv=dv, pairs=np.zeros((preset["pairs"], 2), np.int16), label=0,
             forwards=0, seconds=0.0)
    return len(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--contiguous", action="store_true",
                        help="keep the contiguous memory format (default: channels_last on both "
                        "sides, as narrows uses on the CPU)")
    args = parser.parse_args()

    threads = set_threads(args.threads)
    torch.manual_seed(0)
    model = create(args.model, num_classes=10).eval()
    grid = PlayerGrid(16, 32, 32)
    image = torch.randn(3, 32, 32)
    value = ModelValue(model, grid, torch.zeros(3, 32, 32), "logodds", torch.device("cpu"),
                       channels_last=not args.contiguous)  # converts the model for both sides
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    ratios = (0.2, 0.4, 0.6, 0.8)  # interior orders: every row is a real forward
    rows = len(ratios) * 4 * args.pairs * args.contexts
    inputs = grid.mask(image, torch.rand(rows, grid.n) < 0.5, torch.zeros(3, 32, 32))
    batches = [b.contiguous(memory_format=fmt) for b in inputs.split(args.batch_size)]

    def ours(seed: int) -> float:
        start = time.perf_counter()
        est = estimate_image(value.bind(image, 3), grid.n, ratios, args.pairs, args.contexts,
                             seed=seed, image_id=0, grid=16, batch_size=args.batch_size)
        return est.forwards / (time.perf_counter() - start)

    @torch.inference_mode()
    def bare() -> float:
        start = time.perf_counter()
        for batch in batches:
            model(batch)
        return rows / (time.perf_counter() - start)

    bare(), ours(99)  # warm-up
    a, b = [], []
    for rep in range(args.repeats):
        b.append(bare())
        a.append(ours(rep))
    best = max(a) / max(b)
    ratio = statistics.median(a) / statistics.median(b)
    print(f"model {args.model} ({'contiguous' if args.contiguous else 'channels_last'}), "
          f"32×32, grid 16, batch {args.batch_size}, {threads} threads, "
          f"{rows} masked forwards per repetition, {args.repeats} interleaved repetitions")
    print(f"bare forward     : best {max(b):7.1f}  median {statistics.median(b):7.1f} img/s")
    print(f"narrows estimator: best {max(a):7.1f}  median {statistics.median(a):7.1f} fwd/s")
    print(f"ratio of best rates (ours / bare): {best:.3f}   target >= 0.95")
    print(f"ratio of medians   (ours / bare): {ratio:.3f}")
    print()
    print("preset          forwards/image  without shortcuts  saved   disk/image  upstream disk")
    for name in ("paper-cifar", "fork-imagenet", "cpu-small"):
        p = PRESETS[name]
        n = p["grid"] ** 2
        ours_f = planned_forwards(n, p["ratios"], p["pairs"], p["contexts"])
        up_f = upstream_forwards(p["ratios"], p["pairs"], p["contexts"])
        classes = 1000 if name == "fork-imagenet" else 10
        print(f"{name:<15} {ours_f:>14,} {up_f:>18,} {1 - ours_f / up_f:>6.1%} "
              f"{our_bytes(p) / 1e6:>9.2f} MB {upstream_bytes(p, classes) / 1e6:>11.1f} MB")


if __name__ == "__main__":
    main()
