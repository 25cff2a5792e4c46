"""Choosing which images of a split a method looks at.

A class-sorted folder lists all images of its first class first, so "the first N images" can be
N images of one class. :func:`spread_over_classes` picks them round-robin over the classes
instead, in a seeded order inside each class: the same labels and seed always give the same
indices, and the first ``k`` of ``n`` picks are the picks for ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from narrows.data.base import dataset_labels

Selection = Literal["spread", "first"]
SELECTIONS: tuple[str, ...] = ("spread", "first")


def spread_over_classes(labels: Sequence[int], count: int, *, seed: int = 0) -> list[int]:
    """``count`` indices into ``labels``, round-robin over the classes (in class order).

    Inside each class the images are taken in a seeded random order. Classes with fewer images
    drop out of the rotation once they are used up; ``count`` above ``len(labels)`` gives every
    index once.
    """
    if count < 0:
        raise ValueError("count must be ≥ 0")
    values = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7]))
    queues = []
    for label in np.unique(values):
        members = np.flatnonzero(values == label)
        queues.append(members[rng.permutation(len(members))].tolist())
    picked: list[int] = []
    depth = 0
    target = min(count, len(values))
    while len(picked) < target:
        for queue in queues:
            if depth < len(queue) and len(picked) < target:
                picked.append(int(queue[depth]))
        depth += 1
    return picked


def select_images(dataset: Dataset, count: int, *, seed: int = 0,
                  how: Selection = "spread") -> list[int]:
    """Indices of ``count`` images of ``dataset``, chosen by ``how``: ``"spread"`` over its
    classes (seeded, see :func:`spread_over_classes`) or the ``"first"`` ones."""
    if how == "first":
        return list(range(min(count, len(dataset))))
    if how != "spread":
        raise ValueError(f"unknown selection {how!r}; expected one of {SELECTIONS}")
    return spread_over_classes(dataset_labels(dataset), count, seed=seed)
