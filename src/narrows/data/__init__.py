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
its ``train``/``test`` splits, built when first asked for. Nothing is ever downloaded unless
``download=True``.
"""

from __future__ import annotations

from narrows.data.base import AUGMENTS, DataBundle, DataInfo, TensorImageDataset
from narrows.data.specs import SPEC_HELP, load, parse_spec

__all__ = [
    "AUGMENTS",
    "DataBundle",
    "DataInfo",
    "SPEC_HELP",
    "TensorImageDataset",
    "load",
    "parse_spec",
]
