"""Index-set rules: the default k, which counted k a histogram is read at, k within the width,
and indices files read for a given model (checked, optionally truncated to k ids per class)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from narrows.decompose.indices import ClassIndices
from narrows.decompose.parts import split_head
from narrows.errors import UserError

WIDE = 1024  # feature widths from here on (ImageNet ResNet-50: 2048) default to k = 50


def default_k(width: int) -> int:
    """The default k for a head reading ``width`` channels (D): 5 for CIFAR-size heads
    (D < 1024), 50 for wider ones (ImageNet ResNet-50), as upstream."""
    return 50 if width >= WIDE else 5


def head_shape(model: nn.Module) -> tuple[int, int]:
    """``(classes, channels)``: the outputs and inputs of ``model``'s final linear layer."""
    _, linear = split_head(model)
    return linear.out_features, linear.in_features


def nearest_k(ks: list[int], k: int) -> int:
    """The per-image k counted in the extraction (``ks``) to read the histogram of k from: k
    itself when it was counted, else the largest counted one below it (or the smallest)."""
    if k in ks:
        return k
    below = [x for x in ks if x < k]
    return max(below) if below else min(ks)


def within_width(values: Iterable[tuple[str, int | None]], width: int) -> None:
    """Refuse any ``(name, k)`` of ``values`` whose k (``None``: not given) exceeds the ``width``
    channels the head reads; ``name`` is how the caller calls the value (a parameter, or a
    command-line flag)."""
    for name, value in values:
        if value is not None and value > width:
            raise UserError(f"{name} {value} exceeds the {width} channels the head reads",
                            f"pass {name} of at most {width}")


def truncate(indices: ClassIndices, k: int | None, source: str, name: str = "k") -> ClassIndices:
    """The first ``k`` ids of each class of ``indices`` (all of them when ``k`` is None); an
    error naming ``source`` when a class has fewer. ``name``: what the caller calls ``k``."""
    if k is None:
        return indices
    short = [c for c, row in enumerate(indices.indices) if len(row) < k]
    if short:
        raise UserError(f"{source} has only {len(indices.indices[short[0]])} ids for class "
                        f"{short[0]}, fewer than k = {k}", f"pass a smaller {name}")
    return indices.top(k)


def load_indices(path: str | Path, model: nn.Module, k: int | None = None,
                 name: str = "k") -> ClassIndices:
    """The indices of ``path``, checked against ``model``'s classes and channels; the first
    ``k`` ids of each class when ``k`` is given (see :func:`truncate`); ``name`` is what the
    caller calls ``k`` in messages."""
    classes, channels = head_shape(model)
    indices = ClassIndices.load(path, num_classes=classes, num_channels=channels)
    return truncate(indices, k, str(path), name)
