"""Per-sample IBA against the work it cannot avoid, side by side; and metric throughput.

ours: wall time of ``IBA(model, "layer2", stats).attribute(image, target)`` for one 224×224
image with the defaults (β = 10, 10 steps, noise batch 10): building the bottleneck, freezing
the weights, 10 optimisation steps (each: the model on the one image, the hook expanding the
``layer2`` output to 10 noisy samples, cross-entropy + β·capacity, ``autograd.grad`` w.r.t. α,
Adam), the heatmap (capacity → bits → resize).
necessary: the passes any per-sample IBA has to make: one forward of the prefix up
to ``layer2`` on the image (``run_to_layer``, no graph), then 10 × (forward + backward of the
suffix ``layer3 → layer4 → forward_head`` on a leaf tensor standing in for the ``layer2``
output, expanded to batch 10; cross-entropy; ``autograd.grad`` w.r.t. the leaf only, weights
frozen). No noise, no capacity, no optimiser, no heatmap.

Random-weight timm ``resnet18`` and ``resnet50`` (statistics from a few random batches; their
cost is not timed). The two sides run interleaved, several repetitions each, after a warm-up;
printed: the ratio of the medians and of the best (least disturbed) times. Target ≤ 1.15.
``IBA`` runs the prefix once per image too (``PrefixReplay``), so the overhead is the noise,
capacity and optimiser work and the replay's glue code.

Also printed: evaluation throughput (images/s) of ``degradation`` (tile 8, 100 points, MoRF +
LeRF) and ``bbox_ratio`` on 64 random 32×32 images with random heatmaps, ``resnet20_cifar``.

    python benchmarks/attribution.py [--quick] [--models resnet18 resnet50] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch
import torch.nn.functional as F

import narrows.models  # noqa: F401  (registers resnet20_cifar with timm)
from narrows.attribution import IBA, bbox_ratio, degradation, estimate_statistics, run_to_layer
from narrows.runtime import set_threads

LAYER = "layer2"


def ibench(name: str, repeats: int, steps: int, batch: int, stat_batches: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images = [torch.randn(8, 3, 224, 224) for _ in range(stat_batches)]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few samples only: not a real estimate
        stats = estimate_statistics(model, LAYER, images, n_samples=8 * stat_batches)
    t_stats = time.perf_counter() - t0
    iba = IBA(model, LAYER, stats, beta=10.0, steps=steps, batch_size=batch)
    image = torch.randn(3, 224, 224)
    target = 3

    def ours() -> float:
        start = time.perf_counter()
        iba.attribute(image, target)
        return time.perf_counter() - start

    def suffix(r: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.layer4(model.layer3(r)))

    labels = torch.full((batch,), target, dtype=torch.long)

    def necessary() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            r = run_to_layer(model, LAYER, image[None])
        for _ in range(steps):
            leaf = r.detach().requires_grad_(True)
            loss = F.cross_entropy(suffix(leaf.expand(batch, *r.shape[1:])), labels)
            torch.autograd.grad(loss, leaf)
        return time.perf_counter() - start

    # warm-up: one short pass of each side (allocator, oneDNN primitives)
    IBA(model, LAYER, stats, steps=1, batch_size=batch).attribute(image, target)
    necessary()
    a, b = [], []
    for _ in range(repeats):
        b.append(necessary())
        a.append(ours())
    print(f"{name}: 224×224, bottleneck {LAYER} {tuple(stats.shape)}, β=10, {steps} steps, "
          f"batch {batch}, {repeats} interleaved repetitions (statistics: {stats.n} samples, "
          f"{t_stats:.1f} s, untimed)")
    print(f"  necessary work : best {min(b):7.2f} s  median {statistics.median(b):7.2f} s")
    print(f"  IBA.attribute  : best {min(a):7.2f} s  median {statistics.median(a):7.2f} s")
    print(f"  ratio of best times (ours / necessary): {min(a) / min(b):.3f}   target <= 1.15")
    print(f"  ratio of medians    (ours / necessary): "
          f"{statistics.median(a) / statistics.median(b):.3f}", flush=True)


def ebench(repeats: int, n: int = 64) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", pretrained=False, num_classes=10).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images = torch.randn(n, 3, 32, 32)
    maps = torch.rand(n, 32, 32)
    # one box per image, 6..14 px, inside the image
    boxes = []
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        s = int(torch.randint(6, 15, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, 32 - s, (2,), generator=g))
        boxes.append(torch.tensor([[x0, y0, x0 + s, y0 + s]], dtype=torch.float32))

    def deg() -> float:
        start = time.perf_counter()
        degradation(model, images, maps, tile=8)
        return n / (time.perf_counter() - start)

    def box() -> float:
        start = time.perf_counter()
        bbox_ratio(maps, boxes)
        return n / (time.perf_counter() - start)

    deg(), box()  # warm-up
    d, r = [], []
    for _ in range(repeats):
        d.append(deg())
        r.append(box())
    print(f"evaluation throughput, resnet20_cifar, {n} random 32×32 images, random heatmaps, "
          f"{repeats} repetitions")
    print(f"  degradation (tile 8 → 16 tiles, 100 points, MoRF+LeRF = 200 forwards/image): "
          f"best {max(d):8.1f}  median {statistics.median(d):8.1f} images/s")
    print(f"  bbox_ratio (model-free)                                              : "
          f"best {max(r):8.1f}  median {statistics.median(r):8.1f} images/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--repeats", type=int, default=0,
                        help="repetitions per side (default: 5 for resnet18, 3 for resnet50; "
                        "--quick: 2 and 1)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~1.5 min)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads")
    for name in args.models:
        repeats = args.repeats or ((2 if "18" in name else 1) if args.quick
                                   else (5 if "18" in name else 3))
        ibench(name, repeats, args.steps, args.batch_size, stat_batches=2 if args.quick else 4)
    ebench(3 if args.quick else 5)


if __name__ == "__main__":
    main()
