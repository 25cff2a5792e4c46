"""The scalar v computed from a masked input's logits for the image's true class (spec §1.1)."""

from __future__ import annotations

from typing import Literal

import torch

Reward = Literal["logodds", "logprob", "logit"]
REWARDS: tuple[str, ...] = ("logodds", "logprob", "logit")


def reward(logits: torch.Tensor, label: int, kind: Reward = "logodds") -> torch.Tensor:
    """v per row of ``logits (B, C)`` for the true class ``label``, in float64, by ``kind``:

    ``logodds`` (upstream default): log(p_y / (1 − p_y)) = z_y − logsumexp_{c≠y} z_c, in that
    stable form; ``logprob``: log softmax(z)_y; ``logit``: z_y.
    """
    z = logits.double()
    if kind == "logit":
        return z[:, label]
    if kind == "logprob":
        return torch.log_softmax(z, dim=1)[:, label]
    if kind == "logodds":
        others = z.clone()
        others[:, label] = float("-inf")
        return z[:, label] - torch.logsumexp(others, dim=1)
    raise ValueError(f"unknown reward {kind!r}")
