"""Defaults of ``kvb train`` that follow from the embeddings instead of one data set.

* Classes per task: 2 when that gives at most 10 tasks (upstream's CIFAR-10 split, digits),
  else the smallest divisor of the class count giving at most 10 tasks; a class count without
  such a divisor (a prime, 2 or 3 classes) gets one class per task. Always at least two tasks.
* Pairs per codebook J: half the key-fitting embeddings, rounded down to a power of two, between
  16 and upstream's 4096 (more keys than points leaves most of them dead).
* Key dimension: upstream's 14, at most the embedding's dimension.
* Epochs per task: enough for about :data:`STEPS_PER_TASK` optimiser steps per task, between 1
  and upstream's 2000 (upstream's 2000 epochs suit CIFAR; on a few images they are a handful of
  steps, on ImageNet far too many).
* Key-initialisation epochs: at least 10 and at least :data:`KEY_STEPS` EMA steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TASKS = 10
STEPS_PER_TASK = 1000
KEY_STEPS = 50
MAX_PAIRS = 4096
MIN_PAIRS = 16
DIM_KEY = 14
MAX_EPOCHS = 2000


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` (ascending)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def default_classes_per_task(num_classes: int) -> int:
    """Classes per task for ``num_classes`` classes (module docstring); at least 2 tasks.

    Raises ``ValueError`` for fewer than two classes (nothing to learn incrementally).
    """
    if num_classes < 2:
        raise ValueError(f"{num_classes} class cannot be cut into two or more tasks")
    fitting = [d for d in divisors(num_classes)
               if 2 <= d < num_classes and num_classes // d <= MAX_TASKS]
    return fitting[0] if fitting else 1


@dataclass(frozen=True)
class Scaled:
    """The data-dependent defaults of ``kvb train``."""

    epochs: int
    num_pairs: int
    dim_key: int
    init_epochs: int


def scaled_defaults(*, per_task: int, keys: int, dim: int, batch_size: int) -> Scaled:
    """Defaults for a task of ``per_task`` training embeddings (the largest task), ``keys``
    key-fitting embeddings of dimension ``dim`` and batches of ``batch_size``."""
    per_task, keys = max(per_task, 1), max(keys, 1)
    epochs = min(MAX_EPOCHS, max(1, math.ceil(STEPS_PER_TASK * batch_size / per_task)))
    pairs = 2 ** max(int(math.log2(max(keys // 2, 1))), 0)
    pairs = min(MAX_PAIRS, max(MIN_PAIRS, pairs))
    per_epoch = math.ceil(keys / batch_size)
    init_epochs = max(10, math.ceil(KEY_STEPS / per_epoch))
    return Scaled(epochs=epochs, num_pairs=pairs, dim_key=min(DIM_KEY, max(dim, 1)),
                  init_epochs=init_epochs)
