"""Which orders, pairs and contexts are evaluated (spec §1.4, §2.2, §2.3).

Every draw comes from a ``numpy.random.Generator`` keyed by ``(seed, image id[, ratio])``, so an
image gets the same pairs and contexts whichever other images, ranks or models share the run.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from narrows.errors import UserError

UPSTREAM_RATIOS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                      0.95, 1.0)
PairSampling = Literal["neighbour", "uniform"]


def order_of(n: int, ratio: float) -> int:
    """Order m = int((n − 2)·r), the context size of ratio r (truncation, as upstream)."""
    return int((n - 2) * ratio)


def pair_rng(seed: int, image_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, image_id, 0])


def context_rng(seed: int, image_id: int, ratio_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, image_id, ratio_index + 1])


@lru_cache(maxsize=64)
def max_pairs(grid: int, sampling: PairSampling, radius: int) -> int:
    """How many distinct unordered pairs the sampler can produce."""
    n = grid * grid
    if sampling == "uniform":
        return n * (n - 1) // 2
    pairs = set()
    for r in range(grid):
        for c in range(grid):
            for dr in range(-radius, radius + 1):
                for dc in range(-radius, radius + 1):
                    r2 = min(max(r + dr, 0), grid - 1)
                    c2 = min(max(c + dc, 0), grid - 1)
                    j = r2 * grid + c2
                    i = r * grid + c
                    if i != j:
                        pairs.add((min(i, j), max(i, j)))
    return len(pairs)


def sample_pairs(
    rng: np.random.Generator, grid: int, count: int, sampling: PairSampling = "neighbour",
    radius: int = 2,
) -> np.ndarray:
    """``count`` distinct unordered pairs ``(i, j)`` as an int64 ``(count, 2)`` array.

    ``neighbour`` (upstream): i uniform on the grid, j = i + an offset drawn uniformly from the
    non-zero offsets of the ``(2·radius+1)²`` square, clamped to the grid; rejected if j = i or
    the pair was drawn before. ``uniform``: i ≠ j uniform over all players.
    """
    limit = max_pairs(grid, sampling, radius)
    if count > limit:
        raise UserError(f"{count} distinct pairs were asked for, but a {grid}×{grid} grid has "
                        f"only {limit} {sampling} pairs", f"use --pairs {limit} or fewer")
    offsets = [(dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)
               if (dr, dc) != (0, 0)]
    n = grid * grid
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < count:
        if sampling == "uniform":
            i, j = (int(v) for v in rng.integers(0, n, size=2))
        else:
            r, c = (int(v) for v in rng.integers(0, grid, size=2))
            dr, dc = offsets[int(rng.integers(0, len(offsets)))]
            i = r * grid + c
            j = min(max(r + dr, 0), grid - 1) * grid + min(max(c + dc, 0), grid - 1)
        key = (min(i, j), max(i, j))
        if i == j or key in seen:
            continue
        seen.add(key)
        out.append((i, j))
    return np.asarray(out, dtype=np.int64).reshape(count, 2)


def sample_contexts(rng: np.random.Generator, n: int, pairs: np.ndarray, m: int,
                    count: int) -> np.ndarray:
    """``count`` uniform subsets of size m of N \\ {i, j} per pair: int64 ``(P, count, m)``.

    Each subset is the first m entries of a random permutation of the n − 2 candidates.
    """
    p = pairs.shape[0]
    players = np.arange(n)
    candidates = np.stack([players[(players != i) & (players != j)] for i, j in pairs])
    if m == 0:
        return np.zeros((p, count, 0), dtype=np.int64)
    keys = rng.random((p, count, n - 2))
    order = np.argpartition(keys, m - 1, axis=2)[:, :, :m] if m < n - 2 else np.argsort(keys, 2)
    return np.take_along_axis(candidates[:, None, :], order, axis=2).astype(np.int64)


def unique_context(n: int, m: int) -> bool:
    """Orders with a single possible context (∅ at m = 0, N \\ {i, j} at m = n − 2)."""
    return m == 0 or m == n - 2
