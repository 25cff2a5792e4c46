"""The supervised training loop shared by ``narrows train`` and every method that trains.

:func:`fit` runs the loop; :func:`training_data`, :func:`model_for_training` and
:func:`training_summary` (``narrows.training.setup``) are what ``narrows train`` does around it.
"""

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
from narrows.training.settings import TrainOptions, TrainSettings, learning_rate
from narrows.training.setup import (
    model_for_training,
    training_data,
    training_summary,
)

__all__ = [
    "BEST",
    "LAST",
    "EpochStats",
    "EvalResult",
    "LossFn",
    "Normalizer",
    "TrainOptions",
    "TrainResult",
    "TrainSettings",
    "cross_entropy",
    "epoch_loader",
    "evaluate",
    "fit",
    "learning_rate",
    "make_optimizer",
    "model_for_training",
    "train_one_epoch",
    "training_data",
    "training_summary",
]
