"""Per-sample augmentations by name, on float images in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from narrows.errors import UserError


def tensor_augmentation(name: str, image_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The augmentation of an in-memory data set (fixed image size): crop is pad-4 random crop."""
    pad = max(1, image_size // 8)
    steps = {
        "none": [],
        "crop": [v2.RandomCrop(image_size, padding=pad)],
        "flip": [v2.RandomHorizontalFlip()],
        "crop-flip": [v2.RandomCrop(image_size, padding=pad), v2.RandomHorizontalFlip()],
        "resized-crop-flip": [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
        ],
    }
    if name not in steps:
        raise UserError(
            f"unknown augmentation '{name}'",
            f"use one of: auto, {', '.join(steps)}",
        )
    return v2.Compose(steps[name]) if steps[name] else None
