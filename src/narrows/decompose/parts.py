"""A model split into the features its classifier reads and its final linear layer.

The splitting lives in the core (:mod:`narrows.models.heads`), shared with every tool that needs
a model's pooled features: any model whose classifier is its last ``nn.Linear`` splits, timm
models (``get_classifier()``), narrows' CIFAR models, a plain ``nn.Sequential`` and a user's own
``nn.Module`` alike. The features are the classifier's input, caught by a forward pre-hook.
"""

from __future__ import annotations

from narrows.models.heads import (
    Features,
    check_split,
    classifier_name,
    find_classifier,
    replace_classifier,
    split_head,
)

__all__ = [
    "Features",
    "check_split",
    "classifier_name",
    "find_classifier",
    "replace_classifier",
    "split_head",
]
