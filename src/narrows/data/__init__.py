"""Data sets named by a spec string.

========================  ===============================================================
spec                      what it is
========================  ===============================================================
``digits``                embedded default: scikit-learn's handwritten digits, 3×32×32
``shapes[:k=v,...]``      synthetic shapes on textured backgrounds, with boxes and masks
``cifar10:PATH``          the official ``cifar-10-batches-py`` pickle layout
``cifar100:PATH``         the official ``cifar-100-python`` pickle layout
``imagenet:PATH``         ILSVRC ``train/`` and ``val/`` class folders (+ box XMLs)
``folder:PATH``           class-per-folder images, with or without ``train/``/``val/``
========================  ===============================================================

:func:`load` returns a :class:`DataBundle`: its ``info`` (classes, mean/std, image size) and
its ``train``/``test`` splits, built when first asked for. Every dataset answers
``boxes(index)`` (``K×4`` xyxy pixels of the served image, ``0×4`` without boxes) and
``has_boxes``; :func:`dataset_boxes` also reads through ``Subset`` views.
:func:`select_images` picks images spread over the classes (seeded). Nothing is ever downloaded unless
``download=True``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so parsing a spec (``narrows.data.specs``) stays
# free of torch: the command line checks ``--data`` before the heavy imports.
_WHERE = {
    "AUGMENTS": "base", "DataBundle": "base", "DataInfo": "base", "TensorImageDataset": "base",
    "dataset_boxes": "base", "dataset_has_boxes": "base", "dataset_labels": "base",
    "SELECTIONS": "selection", "select_images": "selection", "spread_over_classes": "selection",
    "SPEC_HELP": "specs", "load": "specs", "parse_spec": "specs",
}

if TYPE_CHECKING:
    from narrows.data.base import (
        AUGMENTS,
        DataBundle,
        DataInfo,
        TensorImageDataset,
        dataset_boxes,
        dataset_has_boxes,
        dataset_labels,
    )
    from narrows.data.selection import SELECTIONS, select_images, spread_over_classes
    from narrows.data.specs import SPEC_HELP, load, parse_spec


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"narrows.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'narrows.data' has no attribute {name!r}")


__all__ = [
    "AUGMENTS",
    "DataBundle",
    "DataInfo",
    "SELECTIONS",
    "SPEC_HELP",
    "TensorImageDataset",
    "dataset_boxes",
    "dataset_has_boxes",
    "dataset_labels",
    "load",
    "parse_spec",
    "select_images",
    "spread_over_classes",
]
