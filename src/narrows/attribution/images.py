"""Which test images a command explains, and how to batch and describe them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from narrows.errors import UserError

__all__ = ["describe_images", "image_batch", "pick_indices"]


def pick_indices(dataset: Any, images: int, indices: Sequence[int] | None = None, seed: int = 0,
                 select: Literal["spread", "first"] = "spread",
                 names: Mapping[str, str] | None = None) -> list[int]:
    """``indices`` if given (checked against ``dataset``), else ``images`` dataset indices
    chosen by ``select`` (spread: round-robin over the classes in an order drawn from
    ``seed``; first: the first ones). ``names`` renames parameters in the error message."""
    from narrows.data import select_images

    chosen = list(indices or [])
    if not chosen:
        return select_images(dataset, images, seed=seed, how=select)
    bad = [i for i in chosen if not 0 <= i < len(dataset)]
    if bad:
        name = (names or {}).get("indices", "indices")
        raise UserError(f"image index {bad[0]} is outside the {len(dataset)} test images",
                        f"give {name} between 0 and {len(dataset) - 1}")
    return chosen


def describe_images(indices: list[int], labels: list[int], class_names: Any) -> str:
    """``"3 test images (2 circle, 1 square)"``: how many of the chosen ``indices`` there are,
    and how many of each class by their ``labels`` (named with ``class_names`` when given;
    at most 8 classes listed)."""
    from collections import Counter

    from narrows.attribution.heatmap import target_name

    counts = Counter(labels)
    parts = [f"{counts[c]} {target_name(c, class_names)}" for c in sorted(counts)]
    shown = ", ".join(parts[:8]) + (f", … ({len(parts)} classes)" if len(parts) > 8 else "")
    return f"{len(indices)} test images ({shown})"


def image_batch(dataset: Any, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, H, W) as the data set serves them, labels (N,)) of ``indices``."""
    items = [dataset[i] for i in indices]
    return (torch.stack([x for x, _ in items]),
            torch.tensor([int(y) for _, y in items], dtype=torch.long))
