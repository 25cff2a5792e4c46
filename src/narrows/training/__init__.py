"""The supervised training loop shared by ``narrows train`` and every method that trains."""

from narrows.training.batches import Normalizer
from narrows.training.evaluate import EvalResult, evaluate
from narrows.training.loop import (
    BEST,
    LAST,
    EpochStats,
    LossFn,
    TrainResult,
    cross_entropy,
    epoch_loader,
    fit,
    make_optimizer,
    train_one_epoch,
)
from narrows.training.settings import TrainSettings, learning_rate

__all__ = [
    "BEST",
    "LAST",
    "EpochStats",
    "EvalResult",
    "LossFn",
    "Normalizer",
    "TrainResult",
    "TrainSettings",
    "cross_entropy",
    "epoch_loader",
    "evaluate",
    "fit",
    "learning_rate",
    "make_optimizer",
    "train_one_epoch",
]
