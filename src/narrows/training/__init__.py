"""The supervised training loop shared by ``narrows train`` and every method that trains.

:func:`fit` runs the loop; :func:`training_data`, :func:`model_for_training` and
:func:`training_summary` (``narrows.training.setup``) are what ``narrows train`` does around it;
:class:`TrainOptions` / :class:`TrainSettings` say how to train (the command's flags and
defaults); ``narrows.training.recipes`` holds the fine-tuning pieces they can switch on
(:func:`layer_decay_groups`, :func:`mixup_loss`, :func:`train_transform`). Names load on first use, so ``narrows.training.settings`` (the options the command
line is built from) imports without torch.
"""

from __future__ import annotations

from narrows.lazy import lazy_package

_WHERE = {
    "Normalizer": "batches",
    "EvalResult": "evaluate", "evaluate": "evaluate",
    "BEST": "loop", "LAST": "loop", "EpochStats": "loop", "LossFn": "loop",
    "TrainResult": "loop", "cross_entropy": "loop", "epoch_loader": "loop", "fit": "loop",
    "make_optimizer": "loop", "train_one_epoch": "loop",
    "TrainOptions": "settings", "TrainSettings": "settings", "learning_rate": "settings",
    "model_for_training": "setup", "training_data": "setup", "training_summary": "setup",
    "prepare_training": "setup", "new_classifier": "setup",
    "layer_decay_groups": "recipes", "mixup_loss": "recipes", "train_transform": "recipes",
    "Augmented": "recipes",
}

__all__ = lazy_package(__name__, _WHERE, shadowed=("evaluate",))
