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

    ``images`` are the uint8 ``N×C×H×W`` tensor and ``labels`` the ``N`` class ids.

    ``boxes(i)`` is the ``K×4`` float tensor of ``(x0, y0, x1, y1)`` pixel boxes of image ``i``
    (``0×4`` without boxes; ``box_list`` holds them all) and ``masks`` a ``N×H×W`` bool tensor,
    when the data set has them. ``transform`` (per sample, on the float image) draws from
    torch's global RNG, so seeding it makes augmentation reproducible.
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
        if boxes is not None and len(boxes) != images.shape[0]:
            raise ValueError("boxes must have one K×4 tensor per image")
        self.box_list = boxes
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
            self.images, self.labels, boxes=self.box_list, masks=self.masks, transform=transform
        )

    def boxes(self, index: int) -> torch.Tensor:
        """The ``K×4`` float xyxy pixel boxes of image ``index`` (``0×4`` when it has none)."""
        if self.box_list is None or self.box_list[index] is None:
            return torch.zeros(0, 4)
        return self.box_list[index].float().reshape(-1, 4)

    @property
    def has_boxes(self) -> bool:
        return self.box_list is not None and any(b is not None and b.numel() for b in self.box_list)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


def _unwrap(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    """The innermost dataset and index behind (nested) ``torch.utils.data.Subset`` views."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    return dataset, index


def dataset_has_boxes(dataset: Dataset) -> bool:
    """Whether any image of ``dataset`` (or of the data set behind a ``Subset``) has a box."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return bool(getattr(dataset, "has_boxes", False))


def dataset_boxes(dataset: Dataset, index: int) -> torch.Tensor:
    """The ``K×4`` float xyxy boxes of image ``index`` of ``dataset`` in served-image pixels
    (``0×4``: none).

    Every data set of :mod:`narrows.data` has ``boxes(index)``; this also reads through
    ``Subset`` views and answers ``0×4`` for datasets without boxes.
    """
    inner, i = _unwrap(dataset, index)
    method = getattr(inner, "boxes", None)
    if not callable(method):
        return torch.zeros(0, 4)
    return method(i).float().reshape(-1, 4)


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every item, read without decoding images where the dataset allows it."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return [inner[int(i)] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]


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
