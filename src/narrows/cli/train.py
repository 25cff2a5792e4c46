"""``narrows train``: supervised training of any registered model on any data spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from narrows.cli.app import command
from narrows.cli.common import flag_errors
from narrows.config import option
from narrows.runs.logger import LogOptions
from narrows.runs.session import CommonOptions, start
from narrows.training.model_kwargs import parse_model_kwargs
from narrows.training.settings import TrainOptions, TrainSubject


@dataclass
class TrainConfig(TrainOptions, TrainSubject, LogOptions, CommonOptions):
    """``narrows train``: what to train (:class:`TrainSubject`) and how (:class:`TrainOptions`)."""

    resume: bool = option(False, "require an unfinished run in --out to continue (re-running "
                          "on the same --out resumes anyway)", affects_result=False)


def prepare(cfg: TrainConfig):
    """``(model, card, data)`` of the options (:func:`narrows.training.setup.prepare_training`)."""
    from narrows.training.setup import prepare_training

    with flag_errors():
        return prepare_training(cfg.data, model=cfg.model, checkpoint=cfg.checkpoint,
                                model_kwargs=parse_model_kwargs(cfg.model_kwargs),
                                image_size=cfg.image_size, download=cfg.download,
                                drop_path=cfg.drop_path)


def execute(cfg: TrainConfig) -> int:
    return run_training(cfg, "train")


def run_training(cfg: TrainConfig, command: str, loss_fn=None, default_name: str = "") -> int:
    """Train as ``narrows train`` does, optionally with another ``loss_fn`` (see ``fit``).

    Method commands that train (order losses, CSG, ...) subclass :class:`TrainConfig` and call
    this with their loss; ``default_name`` is added to the default output directory name.
    """
    from narrows.models import check_name, display_name
    from narrows.training import TrainSettings, fit
    from narrows.training.setup import DEFAULT_MODEL, training_summary

    session = start(cfg)
    if not cfg.checkpoint:
        check_name(cfg.model or DEFAULT_MODEL)  # a wrong name fails before the data is read
    model, card, data = prepare(cfg)
    name = display_name(card.architecture)
    run = open_training_run(cfg, session, command, command.replace(" ", "-"), name, cfg.data,
                            default_name)
    session.say(f"training {name} on {cfg.data} at {card.input_size}×{card.input_size} px "
                f"({len(data.train())} train / {len(data.test())} test images) on "
                f"{session.device}, {session.threads} threads"
                + (f", {session.dist.world_size} processes" if session.dist.enabled else "")
                + f" → {run.path}")
    result = fit(model, data, TrainSettings.from_options(cfg, seed=cfg.seed), card=card,
                 device=session.device, run=run, dist=session.dist, progress=cfg.progress,
                 log=session.say, loss_fn=loss_fn)
    run.write_json("results.json", training_summary(result, card, cfg.data))
    return session.done(result.summary() + f"; curves in {run.file('curves.png')}")


def open_training_run(cfg: TrainConfig, session: Any, command: str, *default: str | None):
    """The run directory (:meth:`Session.open`); ``--resume`` without a checkpoint there is a
    user error."""
    from narrows.errors import UserError
    from narrows.training import LAST

    run = session.open(cfg, command, *default)
    if cfg.resume and not run.exists(LAST):
        raise UserError(f"--resume given but {run.path} has no checkpoint to resume from",
                        "drop --resume to start a new run")
    return run


command(
    "train", TrainConfig, execute,
    summary="train a model on a data set (checkpoints every epoch; resumable)",
    description="Supervised training of any timm or narrows model on any data spec. Writes "
    "config.yaml, metrics.jsonl, curves.png, last.pt (to resume) and best.pt (weights + model "
    "card) to --out. Re-running the same command resumes after the last finished epoch. "
    "Works under torchrun (DDP; gloo on CPU, nccl on GPU).",
    epilog="examples:\n  narrows train --model resnet20_cifar --data digits --epochs 15\n"
    "  narrows train -m resnet56_cifar -d cifar10:data --epochs 200 --schedule step "
    "--milestones 100 150\n  narrows train -m vit_tiny_patch16_224 -d folder:pics --image-size 64\n"
    "  narrows train -m mynets.py:SmallCNN --model-kwargs width=32 -d folder:pics\n"
    "  narrows train --checkpoint backbone.safetensors -d imagenet:data --optimizer adamw "
    "--lr 1e-3 --layer-decay 0.55 --drop-path 0.1 --mixup 0.8 --cutmix 1.0 "
    "--randaugment rand-m9-mstd0.5-inc1 (fine-tuning; 'narrows ssl finetune' has these as "
    "defaults)\n"
    "  torchrun --nproc_per_node 2 -m narrows train -d digits")
