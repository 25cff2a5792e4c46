"""Key initialisation: per-head EMA k-means with Laplace smoothing and dead-code restarts.

State per codebook c: keys ``K_c (J, k)``, EMA counts ``N_c (J)``, EMA sums ``S_c (J, k)``
(the layer's ``keys``, ``ema_counts``, ``ema_sums``; initially K ~ N(0, 1), S = K, N = 0).
One step on a batch of head vectors ``h_i`` (all heads at once):

1. ``a_i = argmin_j ‖h_i − K_j‖²`` (exact, ties to the lowest index; always top-1);
2. ``m_j = #{i : a_i = j}``, ``s_j = Σ_{a_i = j} h_i``;
3. ``N ← γ N + (1 − γ) m``, ``S ← γ S + (1 − γ) s``;
4. ``Ñ_j = (N_j + ε) / (Σ_l N_l + J ε) · Σ_l N_l`` (Laplace smoothing);
5. ``K_j ← S_j / Ñ_j``;
6. every key with ``N_j < θ`` (the unsmoothed count), ``θ = threshold_factor · Q / J`` for Q
   queries (batch × tokens) in a full batch, is restarted on a head vector of the batch.

``restart_mode="reset"`` (the default) fixes two defects of the reference code:

* a restarted key's statistics are reset to agree with its new position, ``N_j = θ`` and
  ``S_j = θ · h`` (the reference leaves the stale, decayed N and S, so the key is recomputed from
  them at the next step and the restart is only remembered if the key is hit at once);
* the restarted keys of one head take *distinct* samples as long as the batch has enough of
  them (the reference draws with replacement), and a batch smaller than a full one (the last
  partial batch of an epoch, 80 vectors for 50 000 images in batches of 256) is pooled with
  the previous batch for the draws — otherwise every key dead at the end of an epoch is a
  duplicate of one of those few vectors.

``restart_mode="upstream"`` reproduces the reference: statistics untouched, independent draws
with replacement from the current batch only. Both are seeded and deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from narrows.kvb.layer import KeyValueBottleneck

RESTART_MODES = ("reset", "upstream")


@dataclass
class KeyInitStats:
    """What key initialisation did: EMA steps, threshold θ, restarts and mean squared distance
    of the head vectors to their assigned keys (before each update) per epoch, and the number
    of keys restarted by the last step (their EMA count was below θ; they sit on samples)."""

    steps: int = 0
    threshold: float = 0.0
    restarts_per_epoch: list[int] = field(default_factory=list)
    distortion_per_epoch: list[float] = field(default_factory=list)
    dead_at_end: int = 0


@dataclass
class StepResult:
    """One EMA step: keys restarted (over all heads) and mean squared distance to the assigned
    keys before the update."""

    restarted: int
    distortion: float


def _per_head(heads: Tensor) -> Tensor:
    """``(Q, C, k)`` of head vectors ``(B, n, C, k)`` or ``(Q, C, k)``."""
    if heads.dim() == 4:
        heads = heads.reshape(-1, *heads.shape[2:])
    if heads.dim() != 3:
        raise ValueError(f"expected head vectors (B, n, C, k) or (Q, C, k), got {tuple(heads.shape)}")
    return heads


@torch.no_grad()
def ema_step(
    layer: KeyValueBottleneck,
    heads: Tensor,
    *,
    threshold: float,
    generator: torch.Generator | None = None,
    restart_mode: str = "reset",
    pool: Tensor | None = None,
) -> StepResult:
    """One EMA k-means step (module docstring) on head vectors ``(B, n, C, k)`` or ``(Q, C, k)``.

    Updates the keys of ``layer`` in place from ``heads``. Restarts draw from ``pool``
    (``(P, C, k)``; default the batch itself) with ``generator`` (a CPU generator).
    ``threshold`` is θ in hits per step; 0 disables restarts. ``restart_mode``: ``"reset"``
    or ``"upstream"`` (module docstring).
    """
    from narrows.kvb.layer import nearest_keys

    if restart_mode not in RESTART_MODES:
        raise ValueError(f"restart_mode must be one of {RESTART_MODES}, got {restart_mode!r}")
    h = _per_head(heads).to(layer.keys.dtype)
    num_queries, C, k = h.shape
    J = layer.num_pairs
    per_head = h.transpose(0, 1).contiguous()  # (C, Q, k)
    assign = nearest_keys(per_head, layer.keys, 1, chunk_heads=layer.chunk_heads)[..., 0]

    nearest = layer.keys.gather(1, assign.unsqueeze(-1).expand(C, num_queries, k))
    distortion = float((per_head - nearest).pow(2).sum(-1).mean())

    flat = assign + (torch.arange(C, device=assign.device) * J).unsqueeze(1)  # (C, Q)
    counts = torch.zeros(C * J, dtype=h.dtype, device=h.device)
    counts.index_add_(0, flat.reshape(-1), torch.ones(C * num_queries, dtype=h.dtype, device=h.device))
    sums = torch.zeros(C * J, k, dtype=h.dtype, device=h.device)
    sums.index_add_(0, flat.reshape(-1), per_head.reshape(-1, k))

    gamma = layer.decay
    N, S = layer.ema_counts, layer.ema_sums
    N.mul_(gamma).add_(counts.view(C, J), alpha=1.0 - gamma)
    S.mul_(gamma).add_(sums.view(C, J, k), alpha=1.0 - gamma)
    total = N.sum(-1, keepdim=True)
    smoothed = (N + layer.eps) / (total + J * layer.eps) * total
    layer.keys.copy_(S / smoothed.unsqueeze(-1))

    dead = N < threshold
    heads_dead, keys_dead = dead.nonzero(as_tuple=True)
    restarted = int(heads_dead.numel())
    if restarted:
        source = per_head if pool is None else _per_head(pool).to(h.dtype).transpose(0, 1)
        size = source.shape[1]
        if restart_mode == "upstream":
            choice = torch.randint(size, (C, J), generator=generator)
        else:  # the r-th dead key of a head takes the r-th sample of a per-head permutation
            order = torch.rand(C, size, generator=generator).argsort(-1)
            rank = (dead.cpu().cumsum(-1) - 1).clamp(min=0) % size
            choice = order.gather(1, rank)
        choice = choice.to(h.device)[heads_dead, keys_dead]
        samples = source[heads_dead, choice]  # (restarted, k)
        layer.keys[heads_dead, keys_dead] = samples
        if restart_mode == "reset":
            N[heads_dead, keys_dead] = threshold
            S[heads_dead, keys_dead] = threshold * samples
    return StepResult(restarted=restarted, distortion=distortion)


def _embeddings(item: object) -> Tensor:
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, Tensor):
        raise TypeError(f"key initialisation expects embedding tensors, got {type(item).__name__}")
    return item


def fit_keys(
    layer: KeyValueBottleneck,
    batches: Iterable[Tensor],
    *,
    epochs: int = 10,
    progress: bool = False,
    restart_mode: str = "reset",
) -> KeyInitStats:
    """Run :func:`ema_step` over ``batches`` for ``epochs`` passes (no freezing here), with
    ``restart_mode`` ``"reset"`` or ``"upstream"`` (module docstring).

    θ = ``threshold_factor`` · (queries in the largest batch seen so far) / J; restarts draw
    from a CPU generator seeded by the layer's seed.
    """
    if restart_mode not in RESTART_MODES:
        raise ValueError(f"restart_mode must be one of {RESTART_MODES}, got {restart_mode!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if isinstance(batches, Iterator):
        raise TypeError("batches is iterated once per epoch: pass a list or a DataLoader, "
                        "not an iterator")
    from narrows.runtime import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(layer.seed, 0x6B657973))
    stats = KeyInitStats()
    full = 0
    previous: Tensor | None = None
    threshold = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc="key init", unit="epoch")
    for _ in range(epochs):
        restarts, weighted, seen = 0, 0.0, 0
        for item in batches:
            z = _embeddings(item).to(layer.projection.device)
            heads = layer.heads(z)
            queries = heads.shape[0] * heads.shape[1]
            full = max(full, queries)
            threshold = layer.threshold_factor * full / layer.num_pairs
            pool = None
            per_head = heads.reshape(queries, layer.num_codebooks, layer.dim_key)
            if restart_mode == "reset" and queries < full and previous is not None:
                pool = torch.cat([per_head, previous[: full - queries]])
            step = ema_step(layer, per_head, threshold=threshold, generator=generator,
                            restart_mode=restart_mode, pool=pool)
            previous = per_head
            stats.dead_at_end = step.restarted
            stats.steps += 1
            restarts += step.restarted
            weighted += step.distortion * queries
            seen += queries
        if seen == 0:
            raise ValueError("key initialisation got no batches")
        stats.restarts_per_epoch.append(restarts)
        stats.distortion_per_epoch.append(weighted / seen)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(distortion=f"{weighted / seen:.4g}", restarts=restarts)
    if bar is not None:
        bar.close()
    stats.threshold = threshold
    return stats
