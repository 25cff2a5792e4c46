"""Turning data-set batches into model inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Normalizer:
    """``(x - mean) / std`` per channel, on the device of the batch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:
            self.mean = self.mean.to(images.device)
            self.std = self.std.to(images.device)
        return (images - self.mean) / self.std

    def inverse(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * self.std.to(inputs.device) + self.mean.to(inputs.device)
