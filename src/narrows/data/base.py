"""The objects every data spec returns: metadata, in-memory and file-backed datasets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import Dataset

Split = Literal["train", "test"]
AUGMENTS = ("auto", "none", "crop", "flip", "crop-flip", "resized-crop-flip")


@dataclass(frozen=True)
class DataInfo:
    """What a model and a method need to know about a data set."""

    spec: str
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_chans: int = 3
    has_boxes: bool = False
    has_masks: bool = False
    default_augment: str = "crop-flip"

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": self.image_size,
            "in_chans": self.in_chans,
            "has_boxes": self.has_boxes,
            "has_masks": self.has_masks,
            "default_augment": self.default_augment,
        }


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 ``N×C×H×W``; items are ``(float image in [0,1], label)``.

    ``boxes[i]`` is a ``K×4`` float tensor of ``(x0, y0, x1, y1)`` pixel boxes and ``masks`` a
    ``N×H×W`` bool tensor, when the data set has them. ``transform`` (per sample, on the float
    image) draws from torch's global RNG, so seeding it makes augmentation reproducible.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        boxes: list[torch.Tensor] | None = None,
        masks: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape N×C×H×W")
        if labels.shape != (images.shape[0],):
            raise ValueError("labels must have one entry per image")
        self.images = images
        self.labels = labels.long()
        self.boxes = boxes
        self.masks = masks
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def with_transform(self, transform: Callable | None) -> TensorImageDataset:
        """The same tensors (not copied) with another per-sample transform."""
        return TensorImageDataset(
            self.images, self.labels, boxes=self.boxes, masks=self.masks, transform=transform
        )

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


@dataclass
class DataBundle:
    """A data set: its metadata and factories for its splits (built on first use)."""

    info: DataInfo
    _factories: dict[str, Callable[[str], Dataset]] = field(repr=False)
    _cache: dict[tuple[str, str], Dataset] = field(default_factory=dict, repr=False)

    def split(self, name: Split, augment: str = "none") -> Dataset:
        """The ``train`` or ``test`` split; ``augment`` is one of :data:`AUGMENTS`."""
        if name not in self._factories:
            raise ValueError(f"unknown split {name!r}; expected one of {sorted(self._factories)}")
        if augment == "auto":
            augment = self.info.default_augment
        key = (name, augment)
        if key not in self._cache:
            self._cache[key] = self._factories[name](augment)
        return self._cache[key]

    def train(self, augment: str = "auto") -> Dataset:
        return self.split("train", augment)

    def test(self) -> Dataset:
        return self.split("test", "none")
