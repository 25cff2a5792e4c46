"""``narrows attribution readout-train``: train a readout bottleneck (spec §6) for a model.

The run directory holds ``readout_statistics.pt`` (estimated once, reused on a rerun),
``readout_last.pt`` (written after every epoch; a rerun of the same command continues from
it), ``metrics.jsonl``, ``readout_curves.png`` and, at the end, ``readout.pt``: the readout
with everything needed to rebuild it (``narrows attribution explain --method readout
--readout FILE``).
"""

from __future__ import annotations

from typing import Any

from narrows.attribution.options import ReadoutTrainOptions
from narrows.cli.app import command
from narrows.cli.attribution import FLAGS, LayerSubject
from narrows.config import compose
from narrows.runs.logger import LogOptions
from narrows.runs.session import CommonOptions, start

ReadoutTrainConfig = compose("ReadoutTrainConfig", ReadoutTrainOptions, LayerSubject,
                             LogOptions, CommonOptions)


def _card(checkpoint: str | None) -> Any:
    """The checkpoint's model card, if it has one."""
    if not checkpoint:
        return None
    from narrows.models import read_checkpoint

    return read_checkpoint(checkpoint).card


def execute(cfg: ReadoutTrainConfig) -> int:
    from narrows.attribution.readout import resolve_readout_layers
    from narrows.attribution.readout_training import (
        CURVES_FILE,
        ReadoutOptions,
        train_readout_run,
    )
    from narrows.errors import UserError
    from narrows.training import Normalizer

    session = start(cfg)
    if session.dist.enabled:
        session.close()
        raise UserError("readout-train runs in one process", "run it without torchrun")
    subject = cfg.load_subject()
    net = subject.model.eval()
    resolve_readout_layers(net, cfg.layer, cfg.readout_layers)  # fails before --out is written
    run = session.open(cfg, "attribution readout-train", "attribution", "readout", subject.stem,
                       cfg.variant)
    options = ReadoutOptions.from_options(cfg, cfg.seed)
    result = train_readout_run(net, subject.bundle, run, options,
                               normalizer=Normalizer(subject.mean, subject.std),
                               device=session.device, progress=cfg.progress,
                               card=_card(cfg.checkpoint), checkpoint=cfg.checkpoint,
                               name=subject.name, names=FLAGS)
    print(result.summary())
    print(f"→ {result.path} (use: narrows attribution explain --method readout --readout "
          f"{result.path}), {run.file(CURVES_FILE)}")
    return 0


command(
    "attribution readout-train", ReadoutTrainConfig, execute,
    summary="train a readout bottleneck: IBA heatmaps in one forward pass",
    description="Train the readout bottleneck of Schulz et al. (ICLR 2020, §6 of the spec): "
    "three 1×1 convs predict the bottleneck's α from the model's feature maps and logits; the "
    "classifier stays frozen. Loss: cross-entropy of the noisy pass + β · mean capacity, Adam. "
    "Estimates the statistics first (readout_statistics.pt, reused on a rerun), checkpoints "
    "readout_last.pt after every epoch (re-running the same command continues after a kill), "
    "writes metrics.jsonl and readout_curves.png per epoch and, at the end, readout.pt for "
    "'attribution explain|evaluate --method readout --readout FILE'. Per image and epoch: two "
    "forward passes and a backward pass from the logits to the bottleneck.",
    epilog="examples:\n  narrows attribution readout-train --checkpoint runs/train/"
    "resnet20_cifar-shapes/best.pt --epochs 10 --beta 1 --lr 1e-3\n"
    "  narrows attribution explain --checkpoint runs/train/resnet20_cifar-shapes/best.pt "
    "--method readout --readout runs/attribution/readout/.../readout.pt")
