"""Losses that encourage or penalise interactions of a band of orders (spec §3).

For an image x on a g×g grid of n = g² players, draw one random permutation of the players and
keep its first ⌊r2·n⌋ players (S2) and its first ⌊r1·n⌋ players (S1 ⊂ S2). With u(S) the logits
of x masked down to S (at the input only; the rest set to the baseline),

    Δu = u(S2) − (r2 / r1) · u(S1)         (coefficient 1 when r1 = 0: Δu = u(S2) − u(∅))

mainly carries the interactions of orders between r1·n and r2·n. ``encourage`` (L+) is the
cross-entropy of softmax(Δu) against the label; ``penalize`` (L−) is Σ_c p_c log p_c with
p = softmax(Δu) (the negative entropy: minimising it makes the band uninformative). The total
is ``lam_cls · CE(f(x), y) + lam_order · L±``, as upstream's ``--lam1``/``--lam2``.

BatchNorm (spec §8 P10): upstream runs the two masked passes in train mode, so BatchNorm
layers update their running statistics with heavily masked images. That is harmless for the
BatchNorm-free AlexNet of the paper but corrupts the evaluation statistics of ResNets and most
timm models. ``bn_mode`` chooses what the masked passes do; the clean pass is never changed:

* ``"freeze_stats"`` (default): normalise with the masked batch's own statistics, as upstream,
  but leave the running statistics untouched. Training follows upstream step for step; only
  what evaluation sees is protected.
* ``"eval_for_masked"``: BatchNorm layers in eval mode (normalised with the running
  statistics, which stay untouched). Early in training from scratch the running statistics
  are far from the batch ones and the masked logits and gradients can blow up (resnet20 on
  digits at lr 0.1 reached NaN in the first epoch); safer when fine-tuning a trained model.
* ``"train"``: upstream, running statistics updated by the masked passes too.

Dropout keeps the model's mode in all three (active in the masked passes when training).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from narrows.errors import UserError
from narrows.interactions.players import BaselineName, PlayerGrid, normalised_baseline

if TYPE_CHECKING:
    from narrows.interactions.options import OrderLossOptions

OrderKind = Literal["encourage", "penalize"]
BNMode = Literal["train", "eval_for_masked", "freeze_stats"]
BN_MODES: tuple[str, ...] = get_args(BNMode)

RECIPES: dict[str, tuple[OrderKind, float, float] | None] = {
    "normal": None,
    "high": ("penalize", 0.0, 0.5),
    "mid": ("encourage", 0.3, 0.7),
    "low": ("penalize", 0.7, 1.0),
}
"""The four models of upstream's ``train.sh`` (spec §3.3), as ``(kind, r1, r2)``.

* ``normal``: plain cross-entropy, the baseline (no order loss).
* ``high``: penalise orders in [0, 0.5·n], so that mostly high-order interactions remain.
* ``mid``: encourage orders in [0.3·n, 0.7·n], the middle orders a normal network lacks.
* ``low``: penalise orders in [0.7·n, n], so that mostly low-order interactions remain.
"""


def players_kept(rate: float, n: int) -> int:
    """⌊rate·n⌋, the mathematical floor (``0.57·100`` → 57, not 56 as float rounding gives)."""
    return math.floor(rate * n + 1e-9)


def nested_masks(batch: int, n: int, k1: int, k2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool masks ``(batch, n)`` of S1 ⊂ S2 with ``k1`` and ``k2`` players.

    Each row uses one uniform random permutation from torch's global RNG: a player is in S_k
    when its position in the permutation is below k.
    """
    position = torch.rand(batch, n).argsort(dim=1)
    return position < k1, position < k2


def delta_u(u2: torch.Tensor, u1: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """u(S2) − (r2/r1)·u(S1), with coefficient 1 when r1 = 0."""
    coef = r2 / r1 if r1 > 0 else 1.0
    return u2 - coef * u1


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of Σ_c p_c log p_c, p = softmax(logits) (≤ 0; −log C at uniform p)."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * log_p).sum(dim=1).mean()


@contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """Put every BatchNorm layer of ``model`` in eval mode; restore each one's mode on exit."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.eval()
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


@contextmanager
def batchnorm_frozen_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode normalise with batch statistics but do not update them.

    Done by clearing ``track_running_stats`` for the duration (restored on exit); restoring
    the buffers afterwards instead would break autograd, which saved them for the backward.
    """
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    flags = [m.track_running_stats for m in layers]
    try:
        for m in layers:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(layers, flags, strict=True):
            m.track_running_stats = flag


def _check(kind: str, r1: float, r2: float, grid: int, baseline: object, bn_mode: str,
           n_draws: int, lam_cls: float, lam_order: float) -> None:
    if kind not in ("encourage", "penalize"):
        raise UserError(f"unknown order loss '{kind}'", "use encourage or penalize")
    if not 0 <= r1 < r2 <= 1:
        raise UserError(f"order rates r1={r1}, r2={r2} are not 0 <= r1 < r2 <= 1",
                        "give rates with 0 <= r1 < r2 <= 1 (e.g. --r1 0.3 --r2 0.7)")
    if grid < 2:
        raise UserError(f"grid {grid} is too small", "use --grid 2 or more")
    if not isinstance(baseline, torch.Tensor) and baseline not in ("mean", "zero"):
        raise UserError(f"unknown baseline '{baseline}'", "use mean, zero or a tensor")
    if bn_mode not in BN_MODES:
        raise UserError(f"unknown bn_mode '{bn_mode}'", f"use one of {', '.join(BN_MODES)}")
    if n_draws < 1:
        raise UserError(f"n_draws {n_draws} must be at least 1", "use --n-draws 1 or more")
    if lam_cls < 0 or lam_order < 0:
        raise UserError(f"loss weights lam_cls={lam_cls}, lam_order={lam_order} must be >= 0",
                        "give non-negative --lam-cls and --lam-order")


class OrderLoss:
    """``lam_cls·CE(f(x), y) + lam_order·L±``, a ``loss_fn(model, inputs, labels)`` for ``fit``.

    ``kind``: ``"encourage"`` (L+) or ``"penalize"`` (L−) the interactions of orders between
    ``r1``·n and ``r2``·n (0 ≤ r1 < r2 ≤ 1, fractions of the n = ``grid``² players; module
    docstring).

    ``inputs`` are normalised images ``(B,C,H,W)``; ``grid`` must divide H and W. ``mean``/
    ``std`` (the data set's, in [0, 1] pixel units) are needed only for ``baseline="zero"``
    or a tensor baseline. ``n_draws`` > 1 averages the order loss over independent mask draws.
    Returns ``(loss, clean logits)``, so train accuracy is clean accuracy. See the module
    docstring for ``bn_mode``. ``label_smoothing`` applies to the classification term only.
    """

    def __init__(
        self,
        kind: OrderKind,
        r1: float,
        r2: float,
        grid: int,
        *,
        baseline: BaselineName | torch.Tensor = "mean",
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        n_draws: int = 1,
        bn_mode: BNMode = "freeze_stats",
        lam_cls: float = 1.0,
        lam_order: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        _check(kind, r1, r2, grid, baseline, bn_mode, n_draws, lam_cls, lam_order)
        if mean is None or std is None:
            if not (isinstance(baseline, str) and baseline == "mean"):
                raise UserError("the order loss needs the data set's mean and std for this "
                                "baseline", "pass mean=... and std=...")
        self.kind, self.r1, self.r2, self.grid = kind, float(r1), float(r2), int(grid)
        self.baseline, self.mean, self.std = baseline, mean, std
        self.n_draws, self.bn_mode = int(n_draws), bn_mode
        self.lam_cls, self.lam_order = float(lam_cls), float(lam_order)
        self.label_smoothing = float(label_smoothing)
        self._players: PlayerGrid | None = None
        self._baseline: torch.Tensor | None = None
        self._reset_metrics()

    @classmethod
    def from_options(cls, options: OrderLossOptions, kind: OrderKind, r1: float, r2: float, *,
                     mean: tuple[float, ...] | None = None,
                     std: tuple[float, ...] | None = None,
                     label_smoothing: float = 0.0) -> OrderLoss:
        """The loss of ``narrows interactions train``: ``(kind, r1, r2)`` (e.g. a
        :data:`RECIPES` entry) with the grid, baseline, draws, BatchNorm mode and weights of
        ``options`` (an :class:`~narrows.interactions.options.OrderLossOptions`)."""
        return cls(kind, r1, r2, options.grid, baseline=options.baseline, mean=mean, std=std,
                   n_draws=options.n_draws, bn_mode=options.bn_mode, lam_cls=options.lam_cls,
                   lam_order=options.lam_order, label_smoothing=label_smoothing)

    # -- the loss -------------------------------------------------------------------------
    def __call__(self, model: nn.Module, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(inputs)
        cls = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        order, correct = self.order_term(model, inputs, labels)
        self._record(cls, order, correct, labels.shape[0])
        return self.lam_cls * cls + self.lam_order * order, logits

    def order_term(self, model: nn.Module, inputs: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L± averaged over ``n_draws`` draws, and the Δu-argmax hits per image (mean of draws)."""
        total = inputs.new_zeros(())
        hits = torch.zeros(labels.shape[0], device=labels.device)
        for _ in range(self.n_draws):
            du = self.delta_u(model, inputs)
            total = total + self.band_loss(du, labels)
            hits = hits + (du.detach().argmax(dim=1) == labels).float()
        return total / self.n_draws, hits / self.n_draws

    def band_loss(self, du: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L+ (cross-entropy of softmax Δu) or L− (mean Σ p log p of softmax Δu)."""
        if self.kind == "encourage":
            return F.cross_entropy(du, labels)
        return negative_entropy(du)

    def delta_u(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Δu for one fresh draw of nested masks per image (two masked forward passes)."""
        players = self.players(inputs)
        k1, k2 = players_kept(self.r1, players.n), players_kept(self.r2, players.n)
        s1, s2 = nested_masks(inputs.shape[0], players.n, k1, k2)
        base = self.baseline_for(inputs)
        with self._masked_mode(model):
            u2 = model(players.mask_batch(inputs, s2, base))
            u1 = model(players.mask_batch(inputs, s1, base))
        return delta_u(u2, u1, self.r1, self.r2)

    def _masked_mode(self, model: nn.Module):
        if self.bn_mode == "eval_for_masked":
            return batchnorm_eval(model)
        if self.bn_mode == "freeze_stats":
            return batchnorm_frozen_stats(model)
        return _unchanged()

    # -- grid and baseline, built for the first input shape seen ----------------------------
    def players(self, inputs: torch.Tensor) -> PlayerGrid:
        h, w = inputs.shape[-2:]
        if self._players is None or (self._players.height, self._players.width) != (h, w):
            self._players = PlayerGrid(self.grid, h, w)
            self._baseline = None
        return self._players

    def baseline_for(self, inputs: torch.Tensor) -> torch.Tensor:
        """The normalised ``(C,H,W)`` baseline on the device and dtype of ``inputs``."""
        c, h, w = inputs.shape[1:]
        base = self._baseline
        if base is None or base.shape != (c, h, w):
            mean = self.mean if self.mean is not None else (0.0,) * c
            std = self.std if self.std is not None else (1.0,) * c
            base = normalised_baseline(self.baseline, tuple(mean), tuple(std), (c, h, w))
        self._baseline = base.to(device=inputs.device, dtype=inputs.dtype)
        return self._baseline

    # -- per-epoch metrics -----------------------------------------------------------------
    def _reset_metrics(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._seen = 0

    def _record(self, cls: torch.Tensor, order: torch.Tensor, hits: torch.Tensor,
                n: int) -> None:
        for name, value in (("order_loss", order.detach() * n), ("cls_loss", cls.detach() * n),
                            ("delta_u_top1", hits.sum())):
            value = value.double()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._seen += n

    def epoch_metrics(self) -> dict[str, float]:
        """Means since the last call of ``order_loss``, ``cls_loss`` and ``delta_u_top1``; resets.

        Per process: under torchrun each rank reports its own share of the data.
        """
        seen = max(self._seen, 1)
        out = {k: float(v) / seen for k, v in self._sums.items()}
        self._reset_metrics()
        return out

    def __repr__(self) -> str:
        return (f"OrderLoss({self.kind!r}, r1={self.r1}, r2={self.r2}, grid={self.grid}, "
                f"baseline={self.baseline!r}, n_draws={self.n_draws}, bn_mode={self.bn_mode!r}, "
                f"lam_cls={self.lam_cls}, lam_order={self.lam_order})")


@contextmanager
def _unchanged() -> Iterator[None]:
    yield
