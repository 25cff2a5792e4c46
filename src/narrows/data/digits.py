"""The embedded default data set: scikit-learn's 1,797 handwritten digits as 3×32×32 images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from narrows.data.augment import tensor_augmentation
from narrows.data.base import DataBundle, DataInfo, TensorImageDataset

IMAGE_SIZE = 32
TEST_FRACTION = 0.3
SPLIT_SEED = 0  # the split is part of the data set's definition: never change it


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # N×8×8 in [0,1]
    up = F.interpolate(pixels[:, None], size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = (up.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target.astype(np.int64))


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified 70/30 split (1,257 train, 540 test)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return np.sort(train), np.sort(test)


def load_digits_bundle(spec: str = "digits") -> DataBundle:
    images, labels = _images()
    train_idx, test_idx = split_indices(labels.numpy())
    train_images = images[train_idx]
    flat = train_images.float().div(255.0)
    mean = tuple(float(v) for v in flat.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in flat.std(dim=(0, 2, 3)))
    info = DataInfo(
        spec=spec,
        name="digits",
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        mean=mean,
        std=std,
        image_size=IMAGE_SIZE,
        default_augment="crop",  # digits are not mirror-symmetric
    )
    train = TensorImageDataset(train_images, labels[train_idx])
    test = TensorImageDataset(images[test_idx], labels[test_idx])

    def factory(base: TensorImageDataset):
        return lambda augment: base.with_transform(tensor_augmentation(augment, IMAGE_SIZE))

    return DataBundle(info, {"train": factory(train), "test": factory(test)})
