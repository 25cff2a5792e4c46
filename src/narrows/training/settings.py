"""What a supervised training run is made of (library-level; the CLI maps its flags onto it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "step", "log", "constant"]


@dataclass
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64
    optimizer: Optimizer = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Schedule = "cosine"
    milestones: list[int] = field(default_factory=list)  # epochs where ``step`` multiplies by gamma
    gamma: float = 0.1
    log_decades: float = 1.0  # ``log``: lr falls by this many powers of ten over the run
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "auto"
    workers: int = 0
    eval_batch_size: int = 256
    seed: int = 0


def learning_rate(settings: TrainSettings, progress: float) -> float:
    """The learning rate at ``progress`` epochs (fractional: the schedule moves every step).

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
