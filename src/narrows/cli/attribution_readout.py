"""``narrows attribution readout-train``: train a readout bottleneck (spec §6) for a model.

The run directory holds ``readout_statistics.pt`` (estimated once, reused on a rerun),
``readout_last.pt`` (written after every epoch; a rerun of the same command continues from
it), ``metrics.jsonl``, ``readout_curves.png`` and, at the end, ``readout.pt``: the readout
with everything needed to rebuild it (``narrows attribution explain --method readout
--readout FILE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from narrows.cli.app import Command, register
from narrows.cli.attribution import FLAGS, LayerSubject
from narrows.cli.common import CommonOptions, open_run, start
from narrows.config import non_negative, option, positive

READOUT = "readout options"


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


def _card(checkpoint: str | None) -> Any:
    """The checkpoint's model card, if it has one."""
    if not checkpoint:
        return None
    from narrows.models import read_checkpoint

    return read_checkpoint(checkpoint).card


def execute(cfg: ReadoutTrainConfig) -> int:
    from narrows.attribution.readout import resolve_readout_layers
    from narrows.attribution.readout_training import CURVES_FILE, train_readout_run
    from narrows.errors import UserError
    from narrows.models.subject import load_subject
    from narrows.runs import default_out
    from narrows.training import Normalizer

    session = start(cfg)
    if session.dist.enabled:
        session.close()
        raise UserError("readout-train runs in one process", "run it without torchrun")
    subject = load_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    net = subject.model.eval()
    resolve_readout_layers(net, cfg.layer, cfg.readout_layers)  # fails before --out is written
    run = open_run(cfg, "attribution readout-train",
                   default_out("attribution", "readout", subject.stem, cfg.variant), session)
    result = train_readout_run(net, subject.bundle, run, _options(cfg),
                               normalizer=Normalizer(subject.mean, subject.std),
                               device=session.device, progress=cfg.progress,
                               card=_card(cfg.checkpoint), checkpoint=cfg.checkpoint,
                               name=subject.name, names=FLAGS)
    print(result.summary())
    print(f"→ {result.path} (use: narrows attribution explain --method readout --readout "
          f"{result.path}), {run.file(CURVES_FILE)}")
    return 0


def _options(cfg: ReadoutTrainConfig) -> Any:
    """The readout options of ``cfg``."""
    from narrows.attribution.readout_training import ReadoutOptions

    return ReadoutOptions(
        layer=cfg.layer, readout_layers=cfg.readout_layers, variant=cfg.variant,
        epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, beta=cfg.beta,
        sigma=cfg.sigma, train_images=cfg.train_images, augment=cfg.augment,
        n_samples=cfg.n_samples, kind=cfg.kind, stats_batch_size=cfg.stats_batch_size,
        seed=cfg.seed)


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
