"""``narrows attribution readout-train``: train a readout bottleneck (spec §6) for a model.

The run directory holds ``readout_statistics.pt`` (estimated once, reused on a rerun),
``readout_last.pt`` (written after every epoch; a rerun of the same command continues from
it), ``metrics.jsonl``, ``readout_curves.png`` and, at the end, ``readout.pt``: the readout
with everything needed to rebuild it (``narrows attribution explain --method readout
--readout FILE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from narrows.cli.app import Command, register
from narrows.cli.attribution import LayerSubject, few_samples_note, n_samples
from narrows.cli.common import CommonOptions, open_run, start
from narrows.config import non_negative, option, positive

READOUT = "readout options"
STATISTICS_FILE = "readout_statistics.pt"
READOUT_FILE = "readout.pt"
CURVES_FILE = "readout_curves.png"


@dataclass
class ReadoutTrainConfig(LayerSubject, CommonOptions):
    layer: str | None = option(None, "readout bottleneck layer [default: layer1 of a ResNet; "
                               "conv3_1 (features.10) of a VGG]")
    readout_layers: list[str] | None = option(
        None, "layers whose feature maps feed the readout net (the logits are always added) "
        "[default: layer1..layer4 of a ResNet, layer1..layer3 of a CIFAR ResNet]",
        metavar="LAYER", group=READOUT)
    variant: Literal["A", "B"] = option(
        "B", "readout net width: B = 2·F_out hidden channels (IBA package), A = F_out/4 "
        "(paper's 'Readout Dense 10')", group=READOUT)
    epochs: int = option(10, "training epochs over the train split (spec: 10 on ImageNet)",
                         check=positive, group=READOUT)
    lr: float = option(1e-5, "Adam learning rate (IBA package, ImageNet: 1e-5). On the small "
                       "embedded data sets β = 10 makes a fast-training readout drop everything "
                       "(capacity → 0 at lr ≥ 1e-4 on shapes); --beta 1 --lr 1e-3 gave useful "
                       "maps there in 10 epochs", check=positive, group=READOUT)
    batch_size: int = option(32, "images per step", check=positive, group=READOUT)
    beta: float = option(10.0, "weight of the information loss (mean capacity in nats per "
                         "element); see --lr for small data sets", check=positive, group=READOUT)
    sigma: float = option(1.0, "σ of the Gaussian blur of λ (0 = none)", check=non_negative,
                          group=READOUT)
    train_images: int | None = option(None, "train on a fixed random subset of N train images "
                                      "[default: all]", check=positive, group=READOUT)
    augment: Literal["none", "auto", "crop", "flip", "crop-flip", "resized-crop-flip"] = option(
        "none", "augmentation of the training images; auto = the data set's standard one",
        group=READOUT)
    n_samples: int | None = option(None, "train images for the readout statistics [default: "
                                   "10,000, or all the split has; ≥ 1,000 advised]",
                                   check=positive, group=READOUT)
    kind: Literal["welford", "relu_rms"] = option(
        "welford", "noise statistics of the bottleneck layer: welford (mean and std) or "
        "relu_rms (paper code, post-ReLU layers)", group=READOUT)
    stats_batch_size: int = option(64, "images per forward pass while estimating statistics",
                                   check=positive, affects_result=False, group=READOUT)


def _statistics(cfg: ReadoutTrainConfig, net: Any, dataset: Any, normalizer: Any, device: Any,
                path: Path) -> Any:
    """The readout statistics from ``path``, or estimated on the train split and saved there."""
    import torch

    from narrows.attribution.readout import ReadoutStatistics, estimate_readout_statistics

    if path.is_file():
        stats = ReadoutStatistics.load(path)
        print(f"reusing readout statistics from {path} (n={stats.logits.n:,})")
        return stats
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.stats_batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    n = min(n_samples(cfg), len(dataset))
    print(f"estimating readout statistics on {n:,} train images ({n:,} forwards)")
    batches = (normalizer(x.to(device)) for x, _ in loader)
    stats = estimate_readout_statistics(net, batches, layer=cfg.layer,
                                        readout_layers=cfg.readout_layers,
                                        n_samples=n_samples(cfg), kind=cfg.kind, device=device,
                                        warn=False)
    few_samples_note(cfg, stats.logits.n, "train", "the readout statistics")
    stats.save(path)
    return stats


def _loader_factory(cfg: ReadoutTrainConfig, dataset: Any, normalizer: Any, device: Any):
    """``factory(epoch)``: that epoch's shuffled (normalised images, labels) batches."""
    import torch

    from narrows.runtime import derive_seed

    def factory(epoch: int):
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 1))
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                             generator=generator)
        for images, labels in loader:
            yield normalizer(images.to(device)), labels.to(device)

    return factory


def _train_subset(cfg: ReadoutTrainConfig, dataset: Any) -> Any:
    import torch

    if cfg.train_images is None or cfg.train_images >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    return torch.utils.data.Subset(dataset, order[: cfg.train_images].tolist())


def write_curves(run: Any, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl (one line per finished epoch) and the loss / capacity curves."""
    from narrows.plotting import pyplot

    run.write_metrics(history)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    epochs = [h["epoch"] for h in history]
    axes[0].plot(epochs, [h["loss"] for h in history], marker="o", label="loss")
    axes[0].plot(epochs, [h["ce"] for h in history], marker="o", label="cross-entropy")
    axes[0].set_ylabel("train loss")
    axes[0].legend()
    axes[1].plot(epochs, [h["capacity"] for h in history], marker="o", color="C2")
    axes[1].set_ylabel("mean capacity (nats/element)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.suptitle("readout training")
    fig.tight_layout()
    run.save_figure(CURVES_FILE, fig)
    plt.close(fig)


def _card(checkpoint: str | None) -> Any:
    """The checkpoint's model card, if it has one."""
    if not checkpoint:
        return None
    from narrows.models import read_checkpoint

    return read_checkpoint(checkpoint).card


def execute(cfg: ReadoutTrainConfig) -> int:
    import torch

    from narrows.attribution.readout import (
        ReadoutBottleneck,
        resolve_readout_layers,
        save_readout,
        train_readout,
    )
    from narrows.errors import UserError
    from narrows.runs import default_out
    from narrows.runtime import derive_seed
    from narrows.training import Normalizer

    session = start(cfg)
    if session.dist.enabled:
        session.close()
        raise UserError("readout-train runs in one process", "run it without torchrun")
    from narrows.models.subject import load_subject

    subject = load_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    net, bundle, name = subject.model.eval(), subject.bundle, subject.name
    normalizer = Normalizer(subject.mean, subject.std)
    resolve_readout_layers(net, cfg.layer, cfg.readout_layers)  # fails before --out is written
    run = open_run(cfg, "attribution readout-train",
                   default_out("attribution", "readout", subject.stem, cfg.variant), session)
    device = session.device
    net.to(device)
    stats = _statistics(cfg, net, bundle.split("train"), normalizer, device,
                        run.file(STATISTICS_FILE))
    torch.manual_seed(derive_seed(cfg.seed, 2))  # the readout net's initial weights
    readout = ReadoutBottleneck(net, stats, variant=cfg.variant, sigma=cfg.sigma)
    dataset = _train_subset(cfg, bundle.split("train", cfg.augment))
    n_params = sum(p.numel() for p in readout.readout_parameters())
    done = len(run.read_metrics())
    print(f"{name}: readout variant {cfg.variant} at '{readout.layer}' reading "
          f"{', '.join(readout.readout_layers)} + logits ({n_params:,} parameters) on {device}")
    print(f"cost: {len(dataset):,} images × {cfg.epochs} epochs × 2 forwards = "
          f"{2 * len(dataset) * cfg.epochs:,} forwards (+ the backward from the logits to "
          f"'{readout.layer}' per image)" + (f"; {done} epochs done" if done else ""))
    history = train_readout(net, readout, _loader_factory(cfg, dataset, normalizer, device),
                            epochs=cfg.epochs, beta=cfg.beta, lr=cfg.lr, device=device,
                            out_dir=run.path, seed=cfg.seed, progress=cfg.progress, log=print,
                            on_epoch=lambda h: write_curves(run, h))
    write_curves(run, history)
    images = bundle.split("test")[0][0]
    training = {"data": bundle.info.spec, "epochs": cfg.epochs, "lr": cfg.lr,
                "batch_size": cfg.batch_size, "beta": cfg.beta, "seed": cfg.seed,
                "train_images": len(dataset), "augment": cfg.augment, "kind": cfg.kind,
                "statistics_samples": stats.logits.n, "final": history[-1]}
    path = save_readout(run.file(READOUT_FILE), readout, input_shape=tuple(images.shape),
                        card=_card(cfg.checkpoint), checkpoint=cfg.checkpoint,
                        training=training)
    run.write_json("results.json", {"model": name, "readout": str(path), **training})
    last = history[-1]
    print(f"done: loss {last['loss']:.4f}, cross-entropy {last['ce']:.4f}, capacity "
          f"{last['capacity']:.4f} nats after {last['epoch']} epochs")
    print(f"→ {path} (use: narrows attribution explain --method readout --readout {path}), "
          f"{run.file(CURVES_FILE)}")
    return 0


register(Command(
    words=("attribution", "readout-train"),
    summary="train a readout bottleneck: IBA heatmaps in one forward pass",
    description="Train the readout bottleneck of Schulz et al. (ICLR 2020, §6 of the spec): "
    "three 1×1 convs predict the bottleneck's α from the model's feature maps and logits; the "
    "classifier stays frozen. Loss: cross-entropy of the noisy pass + β · mean capacity, Adam. "
    "Estimates the statistics first (readout_statistics.pt, reused on a rerun), checkpoints "
    "readout_last.pt after every epoch (re-running the same command continues after a kill), "
    "writes metrics.jsonl and readout_curves.png per epoch and, at the end, readout.pt for "
    "'attribution explain|evaluate --method readout --readout FILE'. Per image and epoch: two "
    "forward passes and a backward pass from the logits to the bottleneck.",
    config=ReadoutTrainConfig,
    target="narrows.cli.attribution_readout:execute",
    epilog="examples:\n  narrows attribution readout-train --checkpoint runs/train/"
    "resnet20_cifar-shapes/best.pt --epochs 10 --beta 1 --lr 1e-3\n"
    "  narrows attribution explain --checkpoint runs/train/resnet20_cifar-shapes/best.pt "
    "--method readout --readout runs/attribution/readout/.../readout.pt",
))
