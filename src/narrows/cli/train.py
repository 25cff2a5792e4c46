"""``narrows train``: supervised training of any registered model on any data spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from narrows.cli.app import Command, register
from narrows.cli.common import CommonOptions, open_run, start
from narrows.config import non_negative, option, positive

DATA_HELP = ("data spec: digits, shapes[:k=v,...], cifar10:PATH, cifar100:PATH, imagenet:PATH, "
             "folder:PATH")


@dataclass
class TrainConfig(CommonOptions):
    model: str | None = option(None, "any timm model name or a narrows one (resnet20_cifar ... "
                               "resnet110_cifar, alexnet_cifar); list: narrows models "
                               "[default: resnet20_cifar, or the architecture of --checkpoint]",
                               short="-m")
    data: str = option("digits", DATA_HELP, short="-d")
    checkpoint: str | None = option(None, "start from these weights (.pt/.pth/.safetensors)",
                                    metavar="FILE")
    image_size: int | None = option(None, "served image size for imagenet:/folder: data "
                                    "[default: 224]", check=positive)
    download: bool = option(False, "allow CIFAR to be downloaded when missing (needs network)")
    epochs: int = option(15, "training epochs", check=positive)
    batch_size: int = option(64, "images per step (per process under torchrun)", check=positive)
    optimizer: Literal["sgd", "adamw"] = option("sgd", "optimizer")
    lr: float = option(0.1, "peak learning rate", check=positive)
    momentum: float = option(0.9, "SGD momentum", check=non_negative)
    weight_decay: float = option(5e-4, "weight decay (not on biases and norm weights)",
                                 check=non_negative)
    schedule: Literal["cosine", "step", "log", "constant"] = option(
        "cosine", "learning-rate schedule: cosine to 0; step (--milestones, --gamma); log "
        "(geometric per epoch, --log-decades powers of ten over the run); constant")
    milestones: list[int] = option([], "epochs where the step schedule multiplies lr by --gamma")
    gamma: float = option(0.1, "step-schedule factor", check=positive)
    log_decades: float = option(1.0, "log schedule: powers of ten the lr falls over the run",
                                check=non_negative)
    warmup_epochs: float = option(0.0, "linear warm-up length in epochs", check=non_negative)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy",
                                    check=non_negative)
    augment: Literal["auto", "none", "crop", "flip", "crop-flip", "resized-crop-flip"] = option(
        "auto", "augmentation; auto = the data set's standard one (digits: crop, no flip)")
    workers: int = option(0, "data-loading worker processes (0 = in the main process; "
                          "in-memory data sets need none)", check=non_negative,
                          affects_result=False)
    eval_batch_size: int = option(256, "images per evaluation batch", check=positive,
                                  affects_result=False)
    resume: bool = option(False, "require an unfinished run in --out to continue (re-running "
                          "on the same --out resumes anyway)", affects_result=False)


def settings_from(cfg: TrainConfig):
    from narrows.training import TrainSettings

    return TrainSettings(
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        milestones=list(cfg.milestones), gamma=cfg.gamma, log_decades=cfg.log_decades,
        warmup_epochs=cfg.warmup_epochs,
        label_smoothing=cfg.label_smoothing, augment=cfg.augment, workers=cfg.workers,
        eval_batch_size=cfg.eval_batch_size, seed=cfg.seed,
    )


DEFAULT_MODEL = "resnet20_cifar"


def build_model(cfg: TrainConfig, info):
    """The model to train and its card: fresh from timm, or from ``--checkpoint``."""
    from narrows.errors import UserError
    from narrows.models import ModelCard, create, load_model

    model_kwargs: dict = {}
    if cfg.checkpoint:
        loaded = load_model(cfg.checkpoint, name=cfg.model)
        model = loaded.model
        architecture = loaded.card.architecture if loaded.card else cfg.model
        model_kwargs = dict(loaded.card.model_kwargs) if loaded.card else {}
    else:
        architecture = cfg.model or DEFAULT_MODEL
        model = create(architecture, num_classes=info.num_classes, in_chans=info.in_chans)
    classes = getattr(model, "num_classes", info.num_classes)
    if classes != info.num_classes:
        raise UserError(
            f"{cfg.checkpoint or architecture} has {classes} classes but {info.spec} has "
            f"{info.num_classes}", "train from a checkpoint of the same classes, or without one")
    card = ModelCard(
        architecture=architecture, num_classes=info.num_classes, in_chans=info.in_chans,
        input_size=info.image_size, mean=tuple(info.mean), std=tuple(info.std),
        class_names=tuple(info.class_names), data_spec=info.spec, model_kwargs=model_kwargs,
    )
    return model, card


def execute(cfg: TrainConfig) -> int:
    return run_training(cfg, "train")


def run_training(cfg: TrainConfig, command: str, loss_fn=None, default_name: str = "") -> int:
    """Train as ``narrows train`` does, optionally with another ``loss_fn`` (see ``fit``).

    Method commands that train (order losses, CSG, ...) subclass :class:`TrainConfig` and call
    this with their loss; ``default_name`` is added to the default output directory name.
    """
    from narrows.data import load
    from narrows.errors import UserError
    from narrows.runs import default_out
    from narrows.training import LAST, fit

    session = start(cfg)
    data = load(cfg.data, download=cfg.download, image_size=cfg.image_size)
    model, card = build_model(cfg, data.info)
    default = default_out(command.replace(" ", "-"), card.architecture, cfg.data, default_name)
    run = open_run(cfg, command, default, session)
    if cfg.resume and not run.exists(LAST):
        raise UserError(f"--resume given but {run.path} has no checkpoint to resume from",
                        "drop --resume to start a new run")
    say = session.say
    say(f"training {card.architecture} on {cfg.data} ({len(data.train())} train / "
        f"{len(data.test())} test images) on {session.device}, {session.threads} threads"
        + (f", {session.dist.world_size} processes" if session.dist.enabled else "")
        + f" → {run.path}")
    result = fit(model, data, settings_from(cfg), card=card, device=session.device, run=run,
                 dist=session.dist, progress=cfg.progress, log=say, loss_fn=loss_fn)
    summary = {
        "model": card.architecture,
        "data": cfg.data,
        "epochs": result.epochs,
        "best_top1": result.best_top1,
        "final": result.final.to_dict() if result.final else None,
        "best_checkpoint": result.best_checkpoint,
        "last_checkpoint": result.last_checkpoint,
    }
    run.write_json("results.json", summary)
    if result.final is not None:
        say(f"done: test top-1 {100 * result.final.top1:.2f}% (best {100 * result.best_top1:.2f}%)"
            f"; weights in {result.best_checkpoint}; curves in {run.file('curves.png')}")
    session.close()
    return 0



register(Command(
    words=("train",),
    summary="train a model on a data set (checkpoints every epoch; resumable)",
    description="Supervised training of any timm or narrows model on any data spec. Writes "
    "config.yaml, metrics.jsonl, curves.png, last.pt (to resume) and best.pt (weights + model "
    "card) to --out. Re-running the same command resumes after the last finished epoch. "
    "Works under torchrun (DDP; gloo on CPU, nccl on GPU).",
    config=TrainConfig,
    target="narrows.cli.train:execute",
    epilog="examples:\n  narrows train --model resnet20_cifar --data digits --epochs 15\n"
    "  narrows train -m resnet56_cifar -d cifar10:data --epochs 200 --schedule step "
    "--milestones 100 150\n  torchrun --nproc_per_node 2 -m narrows train -d digits",
))
