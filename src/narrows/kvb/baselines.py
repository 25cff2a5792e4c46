"""Baselines on frozen embeddings: linear probe, MLP, ridge variants and a VQ bottleneck.

Every baseline is an ``nn.Module`` from embeddings ``(B, D)`` to logits ``(B, K)`` made of a
fixed ``encode`` step (identity for the probes, nearest-key quantisation for the VQ bottleneck)
and a trainable ``head``. They share one training interface::

    model = MLPProbe(dim, classes, hidden=128, seed=0)
    log = model.fit(inputs, labels, FitSettings(epochs=50, lr=1e-3, optimizer="adam"))
    model.predict(test_inputs)          # class ids; model.logits(x) for the logits

* ``fit(inputs (N, D), labels (N,), settings, order=None) -> FitLog`` trains in place on one
  stage's data. ``order`` (optional) is the exact visit sequence, indices into ``inputs`` cut
  into consecutive batches of ``settings.batch_size``; without it, ``settings.epochs`` seeded
  shuffles. ``fit_encoded`` does the same on already encoded inputs (``model.encode(x)``), so a
  caller that trains in many stages encodes once.
* :class:`FitSettings`: epochs, lr, batch size (0 = full batch), ``"sgd"`` (momentum) or
  ``"adam"``, weight decay (``None`` = the model's own: 0 for probes, the ridge strength for
  ridge variants), label smoothing, gradient-norm clip, seed, and ``reuse_optimizer`` (keep one
  optimiser across ``fit`` calls; by default each call makes a fresh one).

The defaults are those of the released baselines (spec §5.5): SGD lr 1e-3, batch 256, label
smoothing 0.1, clip 1.0. Ridge variants are the same probes with weight decay
(:data:`RIDGE_DECAYS`). The VQ bottleneck quantises each head of the embedding to its nearest
frozen key and feeds the concatenated keys to a trainable decoder: it discretises like the
key-value bottleneck, but its shared decoder is rewritten by every task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.errors import UserError

RIDGE_DECAYS = (1e-2, 1e-4, 1e-6)
Optimizer = Literal["sgd", "adam"]


@dataclass(frozen=True)
class FitSettings:
    """How :meth:`Baseline.fit` trains (spec §5.5 defaults)."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 256  # 0: the whole stage as one batch
    optimizer: Optimizer = "sgd"
    momentum: float = 0.0
    weight_decay: float | None = None  # None: the model's own (ridge strength or 0)
    label_smoothing: float = 0.1
    clip: float | None = 1.0
    seed: int = 0
    reuse_optimizer: bool = False


@dataclass
class FitLog:
    """What one ``fit`` call did."""

    steps: int
    visits: int
    mean_loss: float


class Baseline(nn.Module):
    """A fixed ``encode`` followed by a trainable ``head``; see the module docstring."""

    weight_decay: float = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.head: nn.Module = nn.Identity()
        self._optimizer: torch.optim.Optimizer | None = None

    def encode(self, inputs: Tensor) -> Tensor:
        """The head's input for ``inputs`` (no gradient); the identity for probes."""
        return inputs

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.encode(inputs))

    @torch.no_grad()
    def logits(self, inputs: Tensor, batch_size: int = 4096, *, encoded: bool = False) -> Tensor:
        """Logits in chunks, in eval mode (``encoded``: ``inputs`` went through ``encode``)."""
        was = self.training
        self.eval()
        device = _device(self)
        out = []
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size].to(device)
            out.append(self.head(x if encoded else self.encode(x)).cpu())
        self.train(was)
        return torch.cat(out) if out else torch.empty(0, 0)

    def predict(self, inputs: Tensor, batch_size: int = 4096, *, encoded: bool = False) -> Tensor:
        """Predicted class ids."""
        return self.logits(inputs, batch_size, encoded=encoded).argmax(dim=1)

    def fit(self, inputs: Tensor, labels: Tensor, settings: FitSettings = FitSettings(),
            order: Tensor | None = None) -> FitLog:
        """Train the head on ``inputs``/``labels`` (see the module docstring)."""
        encoded = torch.cat([self.encode(inputs[s:s + 4096].to(_device(self))).cpu()
                             for s in range(0, len(inputs), 4096)]) if len(inputs) else inputs
        return self.fit_encoded(encoded, labels, settings, order)

    def fit_encoded(self, features: Tensor, labels: Tensor, settings: FitSettings = FitSettings(),
                    order: Tensor | None = None) -> FitLog:
        """:meth:`fit` on inputs already passed through :meth:`encode`."""
        device = _device(self)
        optimizer = self._optimizer_for(settings)
        params = [p for p in self.head.parameters() if p.requires_grad]
        size = settings.batch_size or len(features)
        if order is None:
            order = shuffled_visits(len(features), settings.epochs, settings.seed)
        self.train()
        steps, total = 0, 0.0
        for batch in _chunks(order, size):
            x, y = features[batch].to(device), labels[batch].to(device)
            loss = F.cross_entropy(self.head(x), y, label_smoothing=settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip is not None and params:
                torch.nn.utils.clip_grad_norm_(params, settings.clip)
            optimizer.step()
            steps += 1
            total += float(loss.detach())
        self.eval()
        return FitLog(steps=steps, visits=len(order), mean_loss=total / max(steps, 1))

    def _optimizer_for(self, settings: FitSettings) -> torch.optim.Optimizer:
        if settings.reuse_optimizer and self._optimizer is not None:
            return self._optimizer
        decay = self.weight_decay if settings.weight_decay is None else settings.weight_decay
        params = [p for p in self.head.parameters() if p.requires_grad]
        if settings.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=settings.lr,
                                                          weight_decay=decay)
        elif settings.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                  weight_decay=decay)
        else:
            raise UserError(f"unknown optimizer {settings.optimizer!r}", "use sgd or adam")
        self._optimizer = opt
        return opt


class LinearProbe(Baseline):
    """One linear layer on the embedding (``bias=False``: upstream's ``lp-no-bias``)."""

    def __init__(self, dim: int, classes: int, *, bias: bool = True, weight_decay: float = 0.0,
                 seed: int | None = None) -> None:
        super().__init__()
        self.weight_decay = weight_decay
        with _seeded(seed):
            self.head = nn.Linear(dim, classes, bias=bias)


class MLPProbe(Baseline):
    """``dim → hidden → ReLU → classes`` on the embedding (upstream's ``mlp-128``)."""

    def __init__(self, dim: int, classes: int, hidden: int = 128, *, weight_decay: float = 0.0,
                 seed: int | None = None) -> None:
        super().__init__()
        self.weight_decay = weight_decay
        with _seeded(seed):
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def ridge(kind: Literal["linear", "mlp"], dim: int, classes: int, weight_decay: float = 1e-4, *,
          hidden: int = 128, seed: int | None = None) -> Baseline:
    """A ridge variant (spec §5.5): the linear or MLP probe trained with weight decay."""
    if weight_decay <= 0:
        raise UserError("a ridge variant needs `weight_decay` > 0", "pass a positive `weight_decay`")
    if kind == "linear":
        return LinearProbe(dim, classes, weight_decay=weight_decay, seed=seed)
    if kind == "mlp":
        return MLPProbe(dim, classes, hidden, weight_decay=weight_decay, seed=seed)
    raise UserError(f"unknown ridge kind {kind!r}", "use linear or mlp")


class VQBottleneck(Baseline):
    """Nearest frozen key per head, the keys concatenated into a trainable decoder.

    ``keys`` is ``(C, J, k)``; ``projection`` ``(C, D, k)`` gives head ``c`` of ``z`` as
    ``P_cᵀ z``, and ``None`` cuts ``z`` into ``C`` consecutive chunks of ``k`` (``C·k = D``).
    ``decoder``: ``"mlp"`` (``C·k → hidden → ReLU → classes``) or ``"linear"``. Ties between
    keys go to the lowest index.
    """

    def __init__(self, keys: Tensor, classes: int, *, projection: Tensor | None = None,
                 decoder: Literal["mlp", "linear"] = "mlp", hidden: int = 128,
                 weight_decay: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if keys.ndim != 3:
            raise ValueError("keys must have shape (C, J, k)")
        books, _, dim_key = keys.shape
        if projection is not None and (projection.ndim != 3 or projection.shape[0] != books
                                       or projection.shape[2] != dim_key):
            raise ValueError("projection must have shape (C, D, k) matching the keys")
        self.register_buffer("keys", keys.detach().clone().float())
        self.register_buffer("projection", None if projection is None
                             else projection.detach().clone().float())
        self.weight_decay = weight_decay
        width = books * dim_key
        with _seeded(seed):
            if decoder == "mlp":
                self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(),
                                          nn.Linear(hidden, classes))
            elif decoder == "linear":
                self.head = nn.Linear(width, classes)
            else:
                raise UserError(f"unknown decoder {decoder!r}", "use mlp or linear")

    @classmethod
    def from_layer(cls, layer: nn.Module, classes: int, **kwargs: Any) -> VQBottleneck:
        """The same frozen keys and projection as a key-value bottleneck ``layer``."""
        chunk = getattr(layer, "splitting_mode", "random_projection") == "chunk"
        projection = None if chunk else layer.projection  # type: ignore[union-attr]
        return cls(layer.keys, classes, projection=projection, **kwargs)  # type: ignore[arg-type]

    def heads(self, inputs: Tensor) -> Tensor:
        """``(B, C, k)`` head vectors of ``inputs (B, D)``."""
        books, _, dim_key = self.keys.shape
        if self.projection is None:
            if inputs.shape[1] != books * dim_key:
                raise ValueError(f"chunk heads need D = C·k = {books * dim_key}, "
                                 f"got {inputs.shape[1]}")
            return inputs.reshape(len(inputs), books, dim_key)
        return torch.einsum("bd,cdk->bck", inputs, self.projection)

    @torch.no_grad()
    def indices(self, inputs: Tensor) -> Tensor:
        """``(B, C)`` index of each head's nearest key (squared Euclidean, exact argmin)."""
        heads = self.heads(inputs.float()).transpose(0, 1)  # (C, B, k)
        books = heads.shape[0]
        out = torch.empty(books, heads.shape[1], dtype=torch.long, device=heads.device)
        step = max(1, (1 << 24) // max(1, heads.shape[1] * self.keys.shape[1]))
        for c in range(0, books, step):
            h, k = heads[c:c + step], self.keys[c:c + step]
            dist = (h.pow(2).sum(-1, keepdim=True) - 2 * h @ k.transpose(1, 2)
                    + k.pow(2).sum(-1).unsqueeze(1))
            out[c:c + step] = dist.argmin(dim=-1)
        return out.transpose(0, 1)

    @torch.no_grad()
    def encode(self, inputs: Tensor) -> Tensor:
        idx = self.indices(inputs)  # (B, C)
        books = torch.arange(self.keys.shape[0], device=idx.device)
        return self.keys[books.unsqueeze(0), idx].flatten(1)  # (B, C·k)


def shuffled_visits(n: int, epochs: int, seed: int) -> Tensor:
    """``epochs`` seeded permutations of ``range(n)``, concatenated."""
    gen = torch.Generator().manual_seed(seed)
    if n == 0 or epochs <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])


def _chunks(order: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


class _seeded:
    """Build under a seeded torch RNG without disturbing the global one (``None``: as is)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._fork: Any = None

    def __enter__(self) -> None:
        if self.seed is not None:
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc)
