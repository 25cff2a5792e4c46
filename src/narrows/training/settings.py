"""What a supervised training run is made of (library-level; the CLI maps its flags onto it)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Literal

from narrows.config import (
    Range,
    at_least,
    fraction,
    increasing,
    non_negative,
    option,
    positive,
    unit_open,
)
from narrows.training.model_kwargs import MODEL_KWARGS_EXAMPLE, check_model_kwargs

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "step", "log", "constant"]


RANDAUGMENT_PART = re.compile(r"(mstd|mmax|inc|m|n|w|p)-?[0-9.]+")


def randaugment_problem(value: str | None) -> str | None:
    """What is wrong with a RandAugment spec in timm's grammar (``rand-m9-mstd0.5-inc1``:
    magnitude m, ops per image n, magnitude std mstd, mmax, inc, w, p), or ``None``."""
    if value is None or value.lower() == "none":
        return None
    parts = value.split("-")
    if parts[0] != "rand":
        return f"'{value}' is not a RandAugment spec (e.g. rand-m9-mstd0.5-inc1)"
    for part in parts[1:]:
        if not RANDAUGMENT_PART.fullmatch(part):
            return (f"'{value}': '{part}' is not a RandAugment setting (m, n, mstd, mmax, inc, "
                    "w or p followed by a number)")
    return None


@dataclass
class TrainOptions:
    """How to train, as ``narrows train`` takes it: every field is also a flag of the commands
    that train (``--epochs``, ``--lr`` ...), with the same default and range."""

    epochs: int = option(15, "training epochs", check=positive)
    batch_size: int = option(64, "images per step (per process under torchrun)", check=positive)
    optimizer: Literal["sgd", "adamw"] = option("sgd", "optimizer")
    lr: float = option(0.1, "peak learning rate", check=positive)
    momentum: float = option(0.9, "SGD momentum", check=unit_open)
    weight_decay: float = option(5e-4, "weight decay (not on biases and norm weights)",
                                 check=non_negative)
    schedule: Literal["cosine", "step", "log", "constant"] = option(
        "cosine", "learning-rate schedule: cosine to --min-lr; step (--milestones, --gamma); log "
        "(geometric per epoch, --log-decades powers of ten over the run); constant")
    milestones: list[int] = option([], "epochs where the step schedule multiplies lr by --gamma "
                                   "(increasing, each within --epochs)",
                                   check=at_least(1).also(increasing))
    gamma: float = option(0.1, "step-schedule factor", check=positive)
    log_decades: float = option(1.0, "log schedule: powers of ten the lr falls over the run",
                                check=non_negative)
    warmup_epochs: float = option(0.0, "linear warm-up length in epochs (from --warmup-lr)",
                                check=non_negative)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy",
                                    check=unit_open)
    warmup_lr: float = option(0.0, "learning rate the warm-up starts from", check=non_negative)
    min_lr: float = option(0.0, "learning rate the cosine schedule ends at", check=non_negative)
    layer_decay: float = option(1.0, "layer-wise lr decay of ViTs (BEiT): block i of d learns "
                                "at lr·decay^(d−i), the embeddings at lr·decay^(d+1), head and "
                                "final norm at lr; also no weight decay on position embedding "
                                "and class tokens (1 = off)",
                                check=Range(0.0, 1.0, low_open=True))
    drop_path: float = option(0.0, "stochastic depth rate (the model's drop_path_rate)",
                              check=Range(0.0, 1.0, high_open=True))
    mixup: float = option(0.0, "mixup alpha (0 = off); mixed targets use a soft-target "
                          "cross-entropy with --label-smoothing", check=non_negative)
    cutmix: float = option(0.0, "cutmix alpha (0 = off)", check=non_negative)
    mixup_prob: float = option(1.0, "probability that a batch is mixed (mixup or cutmix)",
                               check=fraction)
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both "
                                      "are on", check=fraction)
    randaugment: str | None = option(None, "timm RandAugment of the training images, e.g. "
                                     "rand-m9-mstd0.5-inc1 (none = off)", metavar="SPEC",
                                     check=randaugment_problem)
    random_erasing: float = option(0.0, "probability of erasing a random box of each training "
                                   "image with noise (timm RandomErasing, pixel mode)",
                                   check=fraction)
    augment: Literal["auto", "none", "crop", "flip", "crop-flip", "resized-crop-flip"] = option(
        "auto", "augmentation; auto = the data set's standard one (digits: crop, no flip)")
    workers: int = option(0, "data-loading worker processes (0 = in the main process; "
                          "in-memory data sets need none)", check=non_negative,
                          affects_result=False)
    eval_batch_size: int = option(256, "images per evaluation batch", check=positive,
                                  affects_result=False)

    def check_together(self) -> None:
        """Milestones past the last epoch would never apply: refuse them before any work."""
        from narrows.errors import UserError

        late = [m for m in self.milestones if m > self.epochs]
        if late:
            raise UserError(f"--milestones {late[0]} lies beyond --epochs {self.epochs}",
                            f"give milestones between 1 and {self.epochs}")


@dataclass
class TrainSettings(TrainOptions):
    """A training run's settings: :class:`TrainOptions` and the seed (the defaults are the
    command's)."""

    seed: int = 0

    @classmethod
    def from_options(cls, options: Any, **changes: Any) -> TrainSettings:
        """The settings of any object with :class:`TrainOptions`' fields (a command's config)."""
        names = [f.name for f in fields(TrainOptions)]
        given = {name: getattr(options, name) for name in names}
        given["milestones"] = list(given["milestones"])
        return cls(**{**given, **changes})


def learning_rate(settings: TrainSettings, progress: float) -> float:
    """The learning rate at ``progress`` epochs (fractional: the schedule moves every step) of
    the schedule in ``settings``.

    ``cosine`` decays from ``lr`` to ``min_lr`` (default 0) over the run; ``step`` multiplies
    by ``gamma`` at each milestone epoch; ``log`` decays geometrically once per epoch from ``lr``
    to ``lr · 10^−log_decades`` at the last epoch (upstream's ``np.logspace`` schedule of the
    interaction paper); a linear warm-up from ``warmup_lr`` (default 0) to ``lr`` comes first
    when ``warmup_epochs > 0``.
    """
    if settings.warmup_epochs > 0 and progress < settings.warmup_epochs:
        rise = settings.lr - settings.warmup_lr
        return settings.warmup_lr + rise * progress / settings.warmup_epochs
    if settings.schedule == "cosine":
        span = max(settings.epochs - settings.warmup_epochs, 1e-12)
        t = min(max(progress - settings.warmup_epochs, 0.0) / span, 1.0)
        fall = settings.lr - settings.min_lr
        return settings.min_lr + fall * 0.5 * (1.0 + math.cos(math.pi * t))
    if settings.schedule == "log":
        epoch = min(int(progress), settings.epochs - 1)
        return settings.lr * 10 ** (-settings.log_decades * epoch / max(settings.epochs - 1, 1))
    if settings.schedule == "step":
        passed = sum(1 for m in settings.milestones if progress >= m)
        return settings.lr * settings.gamma**passed
    return settings.lr


DATA_HELP = ("data spec: digits, shapes[:k=v,...], cifar10:PATH, cifar100:PATH, imagenet:PATH, "
             "folder:PATH")


@dataclass
class TrainSubject:
    """What to train, on which data (listed before :class:`TrainOptions` in ``--help``)."""

    model: str | None = option(None, "any timm model name or a narrows one (resnet20_cifar ... "
                               "resnet110_cifar, alexnet_cifar; list: narrows models), or your "
                               "own nn.Module as path/to/file.py:ClassName or module:ClassName "
                               "[default: resnet20_cifar, or the architecture of --checkpoint]",
                               short="-m")
    model_kwargs: str | None = option(None, "further model constructor arguments, recorded in "
                                      "the model card (" + MODEL_KWARGS_EXAMPLE + "); values are "
                                      "read as JSON where they parse. Fixed-size models (ViTs) "
                                      "get img_size from the data by themselves",
                                      metavar="K=V,...", check=check_model_kwargs)
    data: str = option("digits", DATA_HELP, short="-d")
    checkpoint: str | None = option(None, "start from these weights (.pt/.pth/.safetensors); a "
                                    "backbone without classifier ('narrows ssl export') gets a "
                                    "new one for --data's classes", metavar="FILE")
    image_size: int | None = option(None, "served image size for imagenet:/folder: data "
                                    "[default: 224, or the card's size with --checkpoint]",
                                    check=positive)
    download: bool = option(False, "allow CIFAR to be downloaded when missing (needs network)")

    def training_data(self) -> Any:
        """``data`` at ``image_size``, or at the size of the ``checkpoint`` it goes on from
        (:func:`narrows.training.setup.training_data`)."""
        from narrows.training.setup import training_data

        return training_data(self.data, image_size=self.image_size, checkpoint=self.checkpoint,
                             download=self.download)
