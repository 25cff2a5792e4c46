"""The streamed per-class frequency histogram of each image's top-k pooled channels.

For every image ``i`` of class ``c`` with pooled response ``h`` (``D`` values), the channels are
ranked by (−h_j, j), so ties go to the lower id, and the first ``k_img`` *positive* ones are
counted into ``n_c``. Several ``k_img`` are counted in one pass: rank ``r`` falls into bucket
``#{k in ks : k <= r}``, and the histogram at ``ks[i]`` is the sum of buckets ``0..i``.

Also counted per class, for the diagnostics: the images, the images with no positive response,
the summed top-k mass ``Σ_{top k_mass} h⁺_j / Σ_j h⁺_j`` (positive parts ``h⁺`` only) and,
for each threshold ``t``, how many images have ``b`` channels whose running normalised mass is
still below ``t`` (``b = 0..D``), from which the selectivity Ψ and the fractional k are read exactly.

The state is ``C·D·len(ks) + C·len(thresholds)·(D+1)`` integers, whatever the data set's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class TopKHistogram:
    """Accumulates the counts of :mod:`this module <narrows.decompose.histogram>` batch by batch.

    ``num_classes`` classes, ``num_channels`` (D) feature channels. ``ks`` are the per-image k
    to count (sorted and deduplicated here, each in ``[1, D]``); ``k_mass`` (default: the
    smallest of ``ks``) the k
    of the top-k-mass diagnostic; ``thresholds`` the mass fractions ``t`` in (0, 1] of Ψ.
    """

    def __init__(
        self,
        num_classes: int,
        num_channels: int,
        ks: Sequence[int],
        *,
        k_mass: int | None = None,
        thresholds: Sequence[float] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        ks = sorted({int(k) for k in ks})
        if not ks or ks[0] < 1 or ks[-1] > num_channels:
            raise ValueError(f"ks must lie in [1, {num_channels}], got {ks}")
        if any(not 0.0 < t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must lie in (0, 1], got {list(thresholds)}")
        self.num_classes, self.num_channels = num_classes, num_channels
        self.ks = ks
        self.k_mass = int(k_mass if k_mass is not None else ks[0])
        self.thresholds = [float(t) for t in thresholds]
        self.device = torch.device(device)
        c, d, t = num_classes, num_channels, len(self.thresholds)
        self.buckets = torch.zeros(c, d, len(ks), dtype=torch.int64, device=self.device)
        self.images = torch.zeros(c, dtype=torch.int64, device=self.device)
        self.dead = torch.zeros(c, dtype=torch.int64, device=self.device)
        self.mass = torch.zeros(c, dtype=self._float, device=self.device)
        self.below = torch.zeros(c, t, d + 1, dtype=torch.int64, device=self.device)
        ranks = torch.arange(ks[-1], device=self.device)
        self._bucket_of_rank = torch.searchsorted(
            torch.tensor(ks, device=self.device), ranks, right=True
        )
        self._t = torch.tensor(self.thresholds, dtype=self._float, device=self.device)
        self._t_ids = torch.arange(len(self.thresholds), device=self.device)

    @property
    def _float(self) -> torch.dtype:
        return torch.float32 if self.device.type == "mps" else torch.float64

    @torch.no_grad()
    def update(self, h: Tensor, labels: Tensor) -> None:
        """Count one batch: ``h`` is ``(N, D)`` pooled responses, ``labels`` ``(N,)`` class ids."""
        if h.ndim != 2 or h.shape[1] != self.num_channels:
            raise ValueError(f"expected (N, {self.num_channels}) responses, got {tuple(h.shape)}")
        h = h.detach().to(self.device)
        labels = labels.to(self.device, torch.int64)
        n, d = h.shape
        if self.device.type == "cpu" and labels.numel():  # elsewhere the check would sync
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes})")
        values, order = torch.sort(h, dim=1, descending=True, stable=True)
        r = self.ks[-1]
        nk = len(self.ks)
        counted = (values[:, :r] > 0).to(torch.int64)
        flat = ((labels[:, None] * d + order[:, :r]) * nk + self._bucket_of_rank[None, :]).reshape(-1)
        self.buckets.view(-1).index_add_(0, flat, counted.reshape(-1))
        self.images.index_add_(0, labels, torch.ones_like(labels))

        # running normalised mass: nondecreasing, so counts below t come from a binary search
        positive = values.clamp(min=0).to(self._float)
        total = positive.sum(dim=1)
        alive = total > 0
        self.dead.index_add_(0, labels, (~alive).to(torch.int64))
        running = (positive / torch.where(alive, total, 1.0)[:, None]).cumsum(dim=1)
        top_mass = torch.where(alive, running[:, self.k_mass - 1], 0.0)
        self.mass.index_add_(0, labels, top_mass)
        if self.thresholds:
            t = len(self.thresholds)
            below = torch.searchsorted(running, self._t.expand(n, t).contiguous())  # (N, T)
            slots = (labels[:, None] * t + self._t_ids) * (d + 1) + below
            weight = alive[:, None].expand(n, t).to(torch.int64)
            self.below.view(-1).index_add_(0, slots.reshape(-1), weight.reshape(-1))

    def state_dict(self) -> dict[str, Any]:
        """Everything counted so far, on the CPU (for resuming and for the result)."""
        return {
            "num_classes": self.num_classes,
            "num_channels": self.num_channels,
            "ks": list(self.ks),
            "k_mass": self.k_mass,
            "thresholds": list(self.thresholds),
            "buckets": self.buckets.cpu(),
            "images": self.images.cpu(),
            "dead": self.dead.cpu(),
            "mass": self.mass.cpu().double(),
            "below": self.below.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output made with the same settings."""
        same = (
            state["num_classes"] == self.num_classes
            and state["num_channels"] == self.num_channels
            and list(state["ks"]) == self.ks
            and state["k_mass"] == self.k_mass
            and [float(t) for t in state["thresholds"]] == self.thresholds
        )
        if not same:
            raise ValueError("saved histogram state was made with other settings")
        for name in ("buckets", "images", "dead", "below"):
            getattr(self, name).copy_(state[name].to(self.device))
        self.mass.copy_(state["mass"].to(self.device, self._float))
