"""UDI vs DINO vs the network at initialisation on ``shapes``, at the scale of a 2-core laptop.

For each method and seed: ``narrows.ssl.trainer.pretrain`` with the ``cpu-small`` preset (and
the changes below), the teacher's kNN top-1 (cls token, k = 20, T = 0.07) on the data's labels
before training (the same network at initialisation) and after; the per-epoch losses against
ln K. Writes ``results.md`` (the table), ``loss.png`` (curves of every run) and
``attention.png`` (the last block's attention of cls and cls+ of the first seed's UDI teacher on
a few test images) into ``--out``. Each run is a narrows run directory, so a killed experiment
resumes where it stopped.

    python benchmarks/ssl_experiment.py [--out runs/ssl-experiment] [--seeds 0 1 2]
        [--epochs 12] [--data shapes:classes=4,size=32,train=1000,test=400] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

#: on top of the cpu-small preset: a 4-block, 96-wide ViT with 8-px patches (16 tokens a global
#: crop, so a step takes about half a second on 2 cores), SRS windows for its 4×4 and 2×2 grids,
#: larger crops (a shape is most of the image) and a higher learning rate for the small batch
CHANGES = {"model_kwargs": "depth=4,patch_size=8,embed_dim=96,num_heads=3", "global_window": 2,
           "local_window": 1, "global_crops_scale": [0.5, 1.0],
           "local_crops_scale": [0.2, 0.5], "lr": 0.02, "batch_size": 32, "warmup_epochs": 2}


def run_one(method: str, seed: int, data: str, epochs: int, out: Path):
    from narrows.runs import RunDir
    from narrows.ssl.options import SSLOptions
    from narrows.ssl.trainer import pretrain

    options = SSLOptions.from_preset("cpu-small", method=method, epochs=epochs, **CHANGES)
    started = time.perf_counter()
    result = pretrain(options, data, run=RunDir(out / f"{method}-seed{seed}"), seed=seed,
                      progress=False, say=lambda *a: None)
    return result, time.perf_counter() - started


def attention_figure(checkpoint: Path, data: str, out: Path, images: int = 4) -> None:
    """cls and cls+ attention (mean over heads) of the UDI teacher's last block."""
    from narrows.data import load
    from narrows.models.vit_tokens import last_attention
    from narrows.plotting import pyplot
    from narrows.ssl.export import load_pretrained
    from narrows.training.batches import Normalizer

    model, facts = load_pretrained(checkpoint)
    model.eval()
    test = load(data).test()
    x = torch.stack([test[i][0] for i in range(images)])
    with torch.no_grad():
        attn = last_attention(model.backbone, Normalizer(facts["mean"], facts["std"])(x))
    n_c = model.num_class_tokens
    side = int((attn.shape[-1] - n_c) ** 0.5)
    plt = pyplot()
    fig, axes = plt.subplots(3, images, figsize=(2 * images, 6))
    for i in range(images):
        axes[0, i].imshow(x[i].permute(1, 2, 0).numpy())
        for row, token in ((1, 0), (2, 1)):
            grid = attn[i, :, token, n_c:].mean(0).reshape(side, side)
            axes[row, i].imshow(grid.numpy(), cmap="inferno")
        for row in range(3):
            axes[row, i].axis("off")
    axes[1, 0].set_title("cls", fontsize=8, loc="left")
    axes[2, 0].set_title("cls+", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ssl-experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--data", default="shapes:classes=4,size=32,train=1000,test=400")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    for method in ("udi", "dino"):
        for seed in args.seeds:
            result, seconds = run_one(method, seed, args.data, args.epochs, out)
            results[method, seed] = result
            final = list(result.knn.values())[-1]
            rows.append((method, seed, result.knn["init"], final, result.metrics[-1]["loss"],
                         seconds))
            print(f"{method} seed {seed}: kNN {100 * result.knn['init']:.1f}% → "
                  f"{100 * final:.1f}%, loss {result.metrics[-1]['loss']:.3f} "
                  f"(ln K {result.ln_k:.3f}), {seconds / 60:.1f} min", flush=True)
    lines = ["| method | seed | kNN top-1 at init | kNN top-1 after | gain (points) | final loss "
             "| minutes |", "|---|---|---|---|---|---|---|"]
    for method, seed, init, final, loss, seconds in rows:
        lines.append(f"| {method} | {seed} | {100 * init:.1f} | {100 * final:.1f} | "
                     f"{100 * (final - init):+.1f} | {loss:.3f} | {seconds / 60:.1f} |")
    for method in ("udi", "dino"):
        gains = [100 * (final - init) for m, _, init, final, _, _ in rows if m == method]
        finals = [100 * final for m, _, _, final, _, _ in rows if m == method]
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        lines.append(f"| **{method} mean** | {len(gains)} seeds | | {statistics.mean(finals):.1f} "
                     f"| {statistics.mean(gains):+.1f} ± {spread:.1f} | | |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    from narrows.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, method in zip(axes, ("udi", "dino"), strict=True):
        for seed in args.seeds:
            results[method, seed].plot(ax=ax)
        ax.set_title(method.upper())
        ax.get_legend().remove() if len(args.seeds) > 1 and ax.get_legend() else None
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    attention_figure(out / f"udi-seed{args.seeds[0]}" / "checkpoint.pt", args.data,
                     out / "attention.png")


if __name__ == "__main__":
    main()
