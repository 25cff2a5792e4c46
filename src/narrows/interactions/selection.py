"""Which images are explained (spec §2.1, official protocol)."""

from __future__ import annotations

from collections.abc import Sequence


def per_class_first(labels: Sequence[int], num_classes: int, count: int) -> list[int]:
    """Indices of the first ⌊count/C⌋ images of each class in data-set order.

    The remainder ``count mod C`` adds one more image to each of the lowest class ids; with
    fewer images than classes, one image from each of the first ``count`` classes. The result
    is sorted by data-set index.
    """
    quota = [count // num_classes + (1 if c < count % num_classes else 0)
             for c in range(num_classes)]
    chosen: list[int] = []
    for index, label in enumerate(labels):
        if quota[label] > 0:
            quota[label] -= 1
            chosen.append(index)
        if not any(quota):
            break
    return chosen
