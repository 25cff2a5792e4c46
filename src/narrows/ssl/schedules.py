"""Per-iteration and per-epoch schedules of UDI/DINO pretraining (spec §5.5 and §6).

Fix of an upstream bug (spec §10.14): upstream crashes when a warm-up is longer than the run
(the lr scheduler asserts; the teacher-temperature schedule asks for a negative-length tensor).
Here every warm-up is clamped to the run: the values of the first epochs are those of a long run
with the same warm-up, and the schedule simply stops where the run stops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup: float = 0.0) -> Tensor:
    """DINO's schedule: linear warm-up then cosine decay; float64 tensor of epochs·iters values.

    Warm-up: ``linspace(start_warmup, base, W)`` over W = warmup_epochs·iters_per_epoch
    iterations (its last value is ``base``). Then, for i = 0 … R−1 with R the remaining
    iterations, ``final + ½(base − final)(1 + cos(π i / R))`` (starts at ``base``, approaches
    ``final``). A warm-up longer than the run is cut at the run's end (§10.14).
    """
    total = max(int(epochs), 0) * max(int(iters_per_epoch), 0)
    warmup_full = max(int(warmup_epochs), 0) * max(int(iters_per_epoch), 0)
    warmup = torch.linspace(start_warmup, base, warmup_full, dtype=torch.float64)[:total]
    rest = total - warmup.numel()
    i = torch.arange(rest, dtype=torch.float64)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * i / max(rest, 1)))
    return torch.cat([warmup, cosine])


def teacher_temperatures(epochs: int, warmup_temp: float, final_temp: float,
                         warmup_epochs: int) -> Tensor:
    """τ_t per epoch: ``linspace(warmup_temp, final_temp, warmup_epochs)`` then ``final_temp``.

    Float64 tensor of ``epochs`` values; a warm-up longer than the run is cut (§10.14).
    """
    warm = torch.linspace(warmup_temp, final_temp, max(int(warmup_epochs), 0),
                          dtype=torch.float64)[: max(int(epochs), 0)]
    flat = torch.full((max(int(epochs), 0) - warm.numel(),), float(final_temp),
                      dtype=torch.float64)
    return torch.cat([warm, flat])


def teacher_temperature(epoch: int, warmup_temp: float, final_temp: float,
                        warmup_epochs: int) -> float:
    """τ_t at one epoch (the same value as :func:`teacher_temperatures` gives for it)."""
    return float(teacher_temperatures(epoch + 1, warmup_temp, final_temp, warmup_epochs)[epoch])


def learning_rate_schedule(peak: float, min_lr: float, epochs: int, iters_per_epoch: int,
                           warmup_epochs: int) -> Tensor:
    """lr per iteration: linear warm-up from 0 to ``peak``, then cosine to ``min_lr`` (§6)."""
    return cosine_schedule(peak, min_lr, epochs, iters_per_epoch, warmup_epochs)


def weight_decay_schedule(start: float, end: float, epochs: int, iters_per_epoch: int) -> Tensor:
    """Weight decay per iteration: cosine from ``start`` to ``end``, no warm-up (§6)."""
    return cosine_schedule(start, end, epochs, iters_per_epoch)


def momentum_schedule(base: float, epochs: int, iters_per_epoch: int) -> Tensor:
    """Teacher EMA momentum per iteration: cosine from ``base`` to 1 (§6)."""
    return cosine_schedule(base, 1.0, epochs, iters_per_epoch)
