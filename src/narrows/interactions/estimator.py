"""Δv(i, j, S) for sampled contexts, through one value function over player masks.

A *value function* maps bool player masks ``(B, n)`` to values ``(B,)``: for a model, masking
the image and taking the reward; for tests, any set function. Everything here (row order, the
sign pattern of Δv, the exact shortcuts) is shared by both.

Rows of one (pair, context k) are, in order (spec §2.4): ``4k+0`` S∪{i,j}, ``4k+1`` S∪{i},
``4k+2`` S∪{j}, ``4k+3`` S, so Δv_k = v[4k] − v[4k+1] − v[4k+2] + v[4k+3].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from narrows.interactions.sampling import (
    context_rng,
    order_of,
    pair_rng,
    sample_contexts,
    sample_pairs,
    unique_context,
)
from narrows.runtime import rebatch

ValueFn = Callable[[torch.Tensor], torch.Tensor]


def pair_rows(n: int, pairs: np.ndarray, contexts: np.ndarray) -> torch.Tensor:
    """The 4 masks of every (pair, context): bool ``(P·K·4, n)`` in the order of §2.4."""
    p, k, m = contexts.shape
    base = torch.zeros(p, k, n, dtype=torch.bool)
    if m:
        base.scatter_(2, torch.from_numpy(contexts), True)
    i = torch.from_numpy(pairs[:, 0]).view(p, 1, 1).expand(p, k, 1)
    j = torch.from_numpy(pairs[:, 1]).view(p, 1, 1).expand(p, k, 1)
    rows = base.unsqueeze(2).repeat(1, 1, 4, 1)  # (P, K, 4, n)
    rows[:, :, 0].scatter_(2, i, True).scatter_(2, j, True)
    rows[:, :, 1].scatter_(2, i, True)
    rows[:, :, 2].scatter_(2, j, True)
    return rows.view(p * k * 4, n)


def delta_v(values: torch.Tensor, pairs: int, contexts: int) -> torch.Tensor:
    """Δv ``(P, K)`` from the values of the rows of :func:`pair_rows`."""
    v = values.double().view(pairs, contexts, 4)
    return v[..., 0] - v[..., 1] - v[..., 2] + v[..., 3]


@dataclass
class Block:
    """Masks to evaluate for one order: either every row, or unique rows plus an index map."""

    rows: torch.Tensor  # (R, n) bool
    pairs: int
    contexts: int
    inverse: torch.Tensor | None = None  # (P·K·4,) index into rows, for deduplicated blocks

    def dv(self, values: torch.Tensor) -> torch.Tensor:
        full = values if self.inverse is None else values[self.inverse]
        return delta_v(full, self.pairs, self.contexts)


def order_block(n: int, pairs: np.ndarray, m: int, contexts: int,
                rng: np.random.Generator) -> Block:
    """The rows for order m. With a single possible context (m = 0 or n − 2) the K contexts are
    the same, so one is evaluated and the rows shared by pairs (v(∅), v(N)) only once."""
    if unique_context(n, m):
        ctx = sample_contexts(rng, n, pairs, m, 1)  # ∅, or every player but i and j
        rows = pair_rows(n, pairs, ctx)
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        return Block(unique, pairs.shape[0], 1, inverse)
    return Block(pair_rows(n, pairs, sample_contexts(rng, n, pairs, m, contexts)),
                 pairs.shape[0], contexts)


def evaluate_blocks(blocks: Sequence[Block], value_fn: ValueFn, batch_size: int,
                    on_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Values of every block's rows, evaluated in full batches that span block boundaries."""
    sizes = [b.rows.shape[0] for b in blocks]
    out = torch.empty(sum(sizes), dtype=torch.float64)
    start = 0
    for chunk in rebatch((block.rows for block in blocks), batch_size):
        out[start:start + chunk.shape[0]] = value_fn(chunk).double().cpu()
        start += chunk.shape[0]
        if on_batch is not None:
            on_batch(chunk.shape[0])
    return list(out.split(sizes))


@dataclass
class ImageInteractions:
    """Δv of one image: ``dv (ratios, P, K)`` float32, its ``pairs (P, 2)``, forwards used."""

    dv: np.ndarray
    pairs: np.ndarray
    forwards: int


def image_plan(n: int, ratios: Sequence[float], pairs: int, contexts: int, *, seed: int,
               image_id: int, grid: int, pair_sampling: str = "neighbour", radius: int = 2
               ) -> tuple[np.ndarray, list[Block], list[int]]:
    """The pairs of one image, one block per distinct order, and each ratio's block index.

    Ratios with the same order share a block (so r = 0 and r = 0.05 on a small grid cost once).
    """
    chosen = sample_pairs(pair_rng(seed, image_id), grid, pairs, pair_sampling, radius)
    blocks: list[Block] = []
    by_order: dict[int, int] = {}
    index: list[int] = []
    for r_index, ratio in enumerate(ratios):
        m = order_of(n, ratio)
        if m not in by_order:
            by_order[m] = len(blocks)
            blocks.append(order_block(n, chosen, m, contexts,
                                      context_rng(seed, image_id, r_index)))
        index.append(by_order[m])
    return chosen, blocks, index


def estimate_image(value_fn: ValueFn, n: int, ratios: Sequence[float], pairs: int, contexts: int,
                   *, seed: int, image_id: int, grid: int, pair_sampling: str = "neighbour",
                   radius: int = 2, batch_size: int = 64,
                   on_batch: Callable[[int], None] | None = None) -> ImageInteractions:
    """Δv for every ratio, pair and context of one image (contexts drawn from the seed).

    ``value_fn`` maps a batch of player masks ``(B, n)`` to values v; ``n`` players lie on a
    ``grid``×``grid`` patch grid; each of ``ratios`` gives the context size int((n − 2)·r).
    ``pairs`` player pairs are drawn per image (``pair_sampling`` ``"neighbour"`` within
    ``radius`` patches, or ``"uniform"``) from ``seed`` and ``image_id``, each with ``contexts``
    contexts. ``on_batch(rows)`` is called after each evaluated batch. Returns Δv
    ``(ratios, pairs, contexts)``, the pairs and the forward count."""
    chosen, blocks, index = image_plan(n, ratios, pairs, contexts, seed=seed, image_id=image_id,
                                       grid=grid, pair_sampling=pair_sampling, radius=radius)
    values = evaluate_blocks(blocks, value_fn, batch_size, on_batch)
    per_block = [b.dv(v) for b, v in zip(blocks, values, strict=True)]
    dv = np.stack([per_block[i].expand(pairs, contexts).numpy() for i in index])
    forwards = sum(b.rows.shape[0] for b in blocks)
    return ImageInteractions(dv.astype(np.float32), chosen, forwards)


def planned_forwards(n: int, ratios: Sequence[float], pairs: int, contexts: int) -> int:
    """Forward passes per image with the exact shortcuts (upper bound: v(∅), v(N) counted once),
    for ``n`` players, ``ratios``, ``pairs`` pairs and ``contexts`` contexts per pair."""
    orders = {order_of(n, r) for r in ratios}
    return sum((3 * pairs + 1) if unique_context(n, m) else 4 * pairs * contexts for m in orders)


def upstream_forwards(ratios: Sequence[float], pairs: int, contexts: int) -> int:
    """Forward passes per image without shortcuts: 4·P·K for every one of ``ratios`` (spec §4.1),
    with P = ``pairs`` and K = ``contexts``."""
    return len(ratios) * 4 * pairs * contexts
