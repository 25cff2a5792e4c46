"""UDI vs DINO vs the network at initialisation vs supervised training, on ``shapes``.

Every method trains the same ViT (4 blocks, 96 wide, 8-px patches, 32-px images) for the same
epochs over the same images: UDI and DINO with ``narrows.ssl.pretrain`` (the ``cpu-small``
preset and the changes of ``ssl_experiment.py``), supervised with ``narrows.training.fit``
(AdamW, cosine, labels used); "init" is the network before training. Each trained network is
then evaluated with every evaluation of ``narrows ssl``: weighted kNN (T 0.07, k 20; features
cls, cls+, cls|cls+, avgpool), a linear probe on cached features (cls of the last 4 blocks, lr
sweep), the patch-level probe (mIoU of background + classes on the patch grid) and the
multi-label probe (which shapes an image holds; cls, cls+, both). Data: ``shapes`` with two
objects an image (labels: the class of the larger visible object).

Writes into ``--out``: one run directory per (method, seed) with its checkpoint and each
evaluation's JSON (a killed comparison resumes: finished steps are read back), the features
cache, ``comparison.json`` / ``.md`` / ``.csv`` (mean ± sample std over seeds) and
``attention.png`` (cls and cls+ attention of the first seed's UDI and DINO teachers).

    python benchmarks/ssl_compare.py [--out runs/ssl-compare] [--seeds 0 1 2] [--epochs 12]
        [--data shapes:...] [--device cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

DATA = "shapes:classes=4,size=32,train=1000,test=400,objects=2,rmin=18,rmax=28"
ARCH = "vit_tiny_patch16_224"
ARCH_KWARGS = "depth=4,patch_size=8,embed_dim=96,num_heads=3"
#: on top of the cpu-small preset (as benchmarks/ssl_experiment.py)
CHANGES = {"model_kwargs": ARCH_KWARGS, "global_window": 2, "local_window": 1,
           "global_crops_scale": [0.5, 1.0], "local_crops_scale": [0.2, 0.5], "lr": 0.02,
           "batch_size": 32, "warmup_epochs": 2}
METHODS = ("udi", "dino", "supervised", "init")
HEADLINE = ("knn cls", "knn cls+", "knn cls|cls+", "knn avgpool", "linear cls@4",
            "patch mIoU", "multilabel mAP cls", "multilabel mAP cls+", "multilabel mAP cls|cls+")


def pretrain_one(method: str, seed: int, data: str, epochs: int, out: Path, device: str) -> Path:
    from narrows.runs import RunDir
    from narrows.ssl.options import SSLOptions
    from narrows.ssl.trainer import pretrain

    options = SSLOptions.from_preset("cpu-small", method=method, epochs=epochs, **CHANGES)
    directory = out / f"{method}-seed{seed}"
    pretrain(options, data, run=RunDir(directory), seed=seed, device=torch.device(device),
             progress=False, say=lambda *a: None)
    return directory / "checkpoint.pt"


def supervised_one(seed: int, data: str, epochs: int, out: Path, device: str) -> Path:
    from narrows.runs import RunDir
    from narrows.training import TrainSettings, fit
    from narrows.training.model_kwargs import parse_model_kwargs
    from narrows.training.setup import prepare_training

    kwargs = {**parse_model_kwargs(ARCH_KWARGS), "img_size": 32}
    torch.manual_seed(seed)
    model, card, bundle = prepare_training(data, model=ARCH, model_kwargs=kwargs)
    settings = TrainSettings(epochs=epochs, batch_size=32, optimizer="adamw", lr=1e-3,
                             weight_decay=0.05, warmup_epochs=2, augment="crop-flip", seed=seed)
    directory = out / f"supervised-seed{seed}"
    fit(model, bundle, settings, card=card, device=torch.device(device), run=RunDir(directory),
        progress=False, log=lambda *a: None)
    return directory / "last.pt"


def backbone_of(method: str, seed: int, checkpoint: Path | None) -> Any:
    from narrows.ssl.backbones import load_eval_backbone

    if method == "init":
        return load_eval_backbone(model=ARCH, model_kwargs=f"{ARCH_KWARGS},img_size=32",
                                  class_tokens=2, seed=seed)
    return load_eval_backbone(str(checkpoint))


def evaluate_one(backbone: Any, data: str, directory: Path, cache: Path, seed: int,
                 device: str) -> dict[str, float]:
    """Every evaluation of one network; each result is saved in ``directory`` and read back
    by a rerun."""
    from narrows.ssl.dense import MultiLabelResult, PatchProbeResult, multilabel_probe, patch_probe
    from narrows.ssl.eval_options import (
        KNNOptions,
        LinearOptions,
        MultiLabelOptions,
        PatchProbeOptions,
    )
    from narrows.ssl.knn_eval import KNNResult, evaluate_knn
    from narrows.ssl.linear import LinearResult, linear_probe

    quiet: dict[str, Any] = {"cache": cache, "device": device, "say": None}
    seeded = {**quiet, "seed": seed}
    steps = {
        "knn": (KNNResult, lambda: evaluate_knn(backbone, data, KNNOptions(k=[20]), **quiet)),
        "linear": (LinearResult, lambda: linear_probe(
            backbone, data, LinearOptions(lr=[0.003, 0.03, 0.3], epochs=100), **seeded)),
        "patch_probe": (PatchProbeResult, lambda: patch_probe(
            backbone, data, PatchProbeOptions(), **seeded)),
        "multilabel": (MultiLabelResult, lambda: multilabel_probe(
            backbone, data, MultiLabelOptions(), **seeded)),
    }
    found: dict[str, Any] = {}
    for name, (kind, compute) in steps.items():
        path = directory / f"{name}.json"
        if path.is_file():
            found[name] = kind.load(path)
            continue
        found[name] = compute()
        found[name].save(path)
    return metrics_of(found)


def metrics_of(found: dict[str, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for row in found["knn"].rows:
        if row["k"] == 20:
            values[f"knn {row['feature']}"] = row["top1"]
    values[f"linear {found['linear'].feature}"] = found["linear"].best_top1
    values["patch mIoU"] = found["patch_probe"].miou
    values["patch pixel mIoU"] = found["patch_probe"].pixel_miou
    for row in found["multilabel"].rows:  # each metric at its best lr on test (DINO's rule)
        swept = [r for r in found["multilabel"].sweep if r["feature"] == row["feature"]]
        values[f"multilabel mAP {row['feature']}"] = max(r["map"] for r in swept)
        values[f"multilabel exact {row['feature']}"] = max(r["exact_match"] for r in swept)
    return values


def attention_figure(backbones: dict[str, Any], data: str, out: Path) -> None:
    from narrows.plotting import pyplot
    from narrows.ssl.attention import visualise_attention
    from narrows.ssl.eval_options import AttentionOptions

    plt = pyplot()
    results = {name: visualise_attention(b, data, AttentionOptions(
        images=6, tokens=["cls", "cls+"] if b.num_class_tokens == 2 else ["cls"]))
        for name, b in backbones.items()}
    first = next(iter(results.values()))
    n = first.images.shape[0]
    rows = 1 + sum(len(result.tokens) for result in results.values())
    fig, axes = plt.subplots(rows, n, figsize=(1.6 * n, 1.6 * rows), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(first.images[i].permute(1, 2, 0).numpy())
        r = 1
        for name, result in results.items():
            for t, token in enumerate(result.tokens):
                axes[r, i].imshow(result.maps[i, t].float().mean(0).numpy(), cmap="inferno")
                if i == 0:
                    axes[r, 0].set_title(f"{name} {token}", fontsize=7, loc="left")
                r += 1
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    from narrows.ssl.compare import ComparisonResult

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ssl-compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    comparison = ComparisonResult(rows=[], data=args.data, notes=[
        f"{args.epochs} epochs over the same {args.data} training images for every trained "
        f"method; ViT {ARCH} {ARCH_KWARGS} at 32 px", "kNN at k = 20, T = 0.07; linear on "
        "cls of the last 4 blocks, best of 3 learning rates on the test split (DINO's rule)"])
    firsts: dict[str, Any] = {}
    for seed in args.seeds:
        for method in METHODS:
            started = time.perf_counter()
            checkpoint = None
            if method in ("udi", "dino"):
                checkpoint = pretrain_one(method, seed, args.data, args.epochs, out, args.device)
            elif method == "supervised":
                checkpoint = supervised_one(seed, args.data, args.epochs, out, args.device)
            backbone = backbone_of(method, seed, checkpoint)
            directory = out / f"{method}-seed{seed}"
            directory.mkdir(parents=True, exist_ok=True)
            values = evaluate_one(backbone, args.data, directory, out / "features", seed,
                                  args.device)
            for metric, value in values.items():
                comparison.add(method, seed, metric, value)
            if seed == args.seeds[0] and method in ("udi", "dino"):
                firsts[method.upper()] = backbone
            print(f"{method} seed {seed}: " + ", ".join(
                f"{m} {100 * v:.1f}" for m, v in values.items())
                + f" ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
    comparison.save(out / "comparison.json")
    table = comparison.markdown([m for m in HEADLINE if m in comparison.metrics])
    (out / "comparison.md").write_text(table)
    from narrows.runs.tables import csv_text

    (out / "comparison.csv").write_text(csv_text(comparison.to_rows()))
    fig, _ = comparison.plot(metrics=[m for m in HEADLINE if m in comparison.metrics])
    fig.savefig(out / "comparison.png", dpi=120)
    attention_figure(firsts, args.data, out / "attention.png")
    print(table)


if __name__ == "__main__":
    main()
