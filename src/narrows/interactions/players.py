"""Players on a g×g grid of image patches, and masking an image down to a set of players.

Player ids are row-major (``id = row * g + col``). A mask is a bool tensor ``(B, n)``; a masked
input keeps the pixels of the players in the mask and puts the baseline everywhere else. Images
are already normalised, so the default baseline ("mean", the data set's mean colour) is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from narrows.errors import UserError

BaselineName = Literal["mean", "zero"]


@dataclass(frozen=True)
class PlayerGrid:
    """A ``grid × grid`` partition of ``height × width`` images into equal patches."""

    grid: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.grid < 2:
            raise UserError(f"grid {self.grid} is too small", "use --grid 2 or more")
        if self.height % self.grid or self.width % self.grid:
            raise UserError(
                f"grid {self.grid} does not divide the {self.height}×{self.width} images into "
                "equal patches",
                f"choose a --grid that divides {self.height} and {self.width}",
            )

    @property
    def n(self) -> int:
        return self.grid * self.grid

    def to_pixels(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, n)`` player masks → ``(B, 1, H, W)`` pixel masks (nearest, exact patches)."""
        g = self.grid
        m = masks.view(-1, 1, g, g)
        m = m.repeat_interleave(self.height // g, dim=2)
        return m.repeat_interleave(self.width // g, dim=3)

    def mask(self, image: torch.Tensor, masks: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """Masked copies of one normalised ``image (C,H,W)`` for each row of ``masks (B,n)``.

        ``baseline`` is a normalised ``(C,H,W)`` (or broadcastable) tensor.
        """
        keep = self.to_pixels(masks.to(image.device))
        return torch.where(keep, image.unsqueeze(0), baseline.unsqueeze(0))

    def mask_batch(self, images: torch.Tensor, masks: torch.Tensor,
                   baseline: torch.Tensor) -> torch.Tensor:
        """Each image of ``images (B,C,H,W)`` masked by its own row of ``masks (B,n)``."""
        keep = self.to_pixels(masks.to(images.device))
        return torch.where(keep, images, baseline.unsqueeze(0) if baseline.ndim == 3 else baseline)


def normalised_baseline(
    baseline: BaselineName | torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    shape: tuple[int, int, int],
) -> torch.Tensor:
    """The baseline in normalised space, ``(C,H,W)`` as given by ``shape``.

    ``mean``: the data set's mean colour, i.e. 0 after normalisation (upstream). ``zero``: black
    in pixel space, ``-mean/std`` after normalisation. A tensor: a pixel-space image in [0, 1]
    (``(C,H,W)``, or ``(C,1,1)`` for a colour), normalised here.
    """
    c, h, w = shape
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    if isinstance(baseline, torch.Tensor):
        if baseline.ndim != 3 or baseline.shape[0] != c:
            raise UserError(f"baseline of shape {tuple(baseline.shape)} does not fit {c}×{h}×{w} "
                            "images", "give a C×H×W (or C×1×1) pixel-space tensor")
        return ((baseline.float() - m) / s).expand(c, h, w).contiguous()
    if baseline == "mean":
        return torch.zeros(c, h, w)
    if baseline == "zero":
        return ((0 - m) / s).expand(c, h, w).contiguous()
    raise UserError(f"unknown baseline '{baseline}'", "use mean, zero or a tensor")
