"""What a supervised training run is made of (library-level; the CLI maps its flags onto it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from narrows.config import (
    at_least,
    increasing,
    non_negative,
    option,
    positive,
    unit_open,
)

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "step", "log", "constant"]


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
        "cosine", "learning-rate schedule: cosine to 0; step (--milestones, --gamma); log "
        "(geometric per epoch, --log-decades powers of ten over the run); constant")
    milestones: list[int] = option([], "epochs where the step schedule multiplies lr by --gamma "
                                   "(increasing, each within --epochs)",
                                   check=at_least(1).also(increasing))
    gamma: float = option(0.1, "step-schedule factor", check=positive)
    log_decades: float = option(1.0, "log schedule: powers of ten the lr falls over the run",
                                check=non_negative)
    warmup_epochs: float = option(0.0, "linear warm-up length in epochs", check=non_negative)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy",
                                    check=unit_open)
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

    ``cosine`` decays from ``lr`` to 0 over the run; ``step`` multiplies by ``gamma`` at each
    milestone epoch; ``log`` decays geometrically once per epoch from ``lr`` to
    ``lr · 10^−log_decades`` at the last epoch (upstream's ``np.logspace`` schedule of the
    interaction paper); a linear warm-up from 0 comes first when ``warmup_epochs > 0``.
    """
    if settings.warmup_epochs > 0 and progress < settings.warmup_epochs:
        return settings.lr * progress / settings.warmup_epochs
    if settings.schedule == "cosine":
        span = max(settings.epochs - settings.warmup_epochs, 1e-12)
        t = min(max(progress - settings.warmup_epochs, 0.0) / span, 1.0)
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if settings.schedule == "log":
        epoch = min(int(progress), settings.epochs - 1)
        return settings.lr * 10 ** (-settings.log_decades * epoch / max(settings.epochs - 1, 1))
    if settings.schedule == "step":
        passed = sum(1 for m in settings.milestones if progress >= m)
        return settings.lr * settings.gamma**passed
    return settings.lr
