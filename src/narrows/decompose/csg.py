"""The class-specific gate (CSG) baseline of Liang et al. (ECCV 2020), on the core training loop.

A gate ``G ∈ R^{C×D}`` sits on the pooled features ``h`` of the last feature layer. The ordinary
("STD") path is the unchanged network and is what inference uses; the CSG path of an image with
label ``y`` reads ``z^G = W·(h ⊙ G[y]) + b`` with the same classifier ``W, b`` (gating the
feature map before average pooling is the same, pooling being linear). Training adds the
cross-entropy of ``z^G`` and a hinge on the gate's L1 norm,
``d(G) = max(0, ‖vec G‖₁ − target_density·C·D)`` (the official implementation, whose target is
0.2·C·D).

Schedules:

* ``alternate`` (official): whole epochs alternate between the paths. Epoch ``e`` (from 0) is a
  CSG epoch when ``e ≥ warmup`` and ``(e − warmup) mod period ≥ period − csg_epochs``; its loss
  is ``lam_ce·CE(z^G) + lam_l1·d(G)``. The other epochs train ``CE(z)`` alone, and the gate gets
  no gradient (so the optimiser leaves it alone, momentum included).
* ``joint`` (the paper's form): every step, ``CE(z) + lam_ce·CE(z^G) + lam_l1·d(G)``.

Constraint on ``G`` after each step (``clip``): ``official`` divides each channel's column by its
maximum over classes and clamps to [0, 1]; ``clamp`` only clamps; ``none`` leaves it free. It is
applied before every forward pass and before the gate is read or saved, which is the same as
applying it right after each optimiser step.

Class → channels: the ``k`` **largest** gates of each class. Upstream's shipped CSG indices and
its MI script take an ascending ``argsort``, i.e. the ``k`` smallest gates, the filters the
class needs *least*; that is available as ``order="upstream"`` only, to reproduce the bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.decompose.indices import ClassIndices, rank_desc
from narrows.decompose.parts import split_head
from narrows.errors import UserError

Schedule = Literal["alternate", "joint"]
Clip = Literal["official", "clamp", "none"]
GateOrder = Literal["largest", "upstream"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
CLIPS: tuple[str, ...] = get_args(Clip)
ORDERS: tuple[str, ...] = get_args(GateOrder)
GATE_KEY = "csg_gate"  # the gate's entry in a narrows CSG checkpoint (``csg.pt``)


def sparsity(gate: Tensor, target_density: float) -> Tensor:
    """``max(0, ‖vec G‖₁ − target_density·C·D)``: the official hinge on the gate's L1 norm."""
    return F.relu(gate.abs().sum() - target_density * gate.numel())


def density(gate: Tensor) -> float:
    """``‖vec G‖₁ / (C·D)``, the CSG paper's L1-density (lower is sparser)."""
    return float(gate.detach().abs().sum()) / max(gate.numel(), 1)


@torch.no_grad()
def project(gate: Tensor, clip: Clip) -> Tensor:
    """Apply the constraint ``clip`` to ``gate`` in place (see the module docstring); returns it.

    ``official``: a column whose maximum over classes is positive is divided by it, then all
    entries are clamped to [0, 1] (a column with no positive entry becomes 0).
    """
    if clip == "official":
        top = gate.amax(dim=0, keepdim=True)
        gate.div_(torch.where(top > 0, top, torch.ones_like(top)))
    if clip in ("official", "clamp"):
        gate.clamp_(0.0, 1.0)
    elif clip != "none":
        raise UserError(f"unknown gate clip '{clip}'", f"use one of {', '.join(CLIPS)}")
    return gate


class CSGNetwork(nn.Module):
    """``net`` with a class-specific gate on its pooled features.

    ``forward(x)`` is ``net(x)`` (the STD path: evaluation and inference); ``forward(x, labels)``
    returns ``(z, z^G)`` from one pass through the backbone. The gate is stored flat
    (``gate_flat``, ``C·D``), so the core optimiser, which decays only parameters of two or more
    dimensions, applies no weight decay to it; :attr:`gate` is its ``(C, D)`` view.
    ``epochs_done`` counts finished epochs (advanced by :meth:`CSGLoss.epoch_metrics`); being a
    buffer, it is saved in and restored from the loop's checkpoints, so a resumed run knows
    which epochs are CSG epochs.
    """

    def __init__(self, net: nn.Module, init: float = 0.5) -> None:
        super().__init__()
        _, linear = split_head(net)
        self.net = net
        self.num_classes, self.num_channels = linear.out_features, linear.in_features
        self.gate_flat = nn.Parameter(torch.full((self.num_classes * self.num_channels,),
                                                 float(init)))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    @property
    def gate(self) -> Tensor:
        return self.gate_flat.view(self.num_classes, self.num_channels)

    def project_(self, clip: Clip) -> Tensor:
        """Apply the constraint ``clip`` to the gate in place; returns the ``(C, D)`` values."""
        return project(self.gate_flat.data.view(self.num_classes, self.num_channels), clip)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if labels is None:
            return self.net(x)
        features, linear = split_head(self.net)
        h = features(x)
        return linear(h), linear(h * self.gate[labels])


@dataclass(frozen=True)
class Alternate:
    """Which epochs are CSG epochs under the ``alternate`` schedule (module docstring)."""

    period: int = 2
    csg_epochs: int = 1
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.period < 1 or not 1 <= self.csg_epochs <= self.period or self.warmup < 0:
            raise UserError(
                f"bad CSG schedule: period {self.period}, csg epochs {self.csg_epochs}, "
                f"warm-up {self.warmup}", "use period >= 1, 1 <= csg epochs <= period, "
                "warm-up >= 0")

    def is_csg(self, epoch: int) -> bool:
        """True when epoch ``epoch`` (counted from 0) trains the CSG path."""
        if epoch < self.warmup:
            return False
        return (epoch - self.warmup) % self.period >= self.period - self.csg_epochs


class CSGLoss:
    """The CSG objective as a ``loss_fn(model, inputs, labels) -> (loss, logits)`` for ``fit``.

    ``model`` must be (or wrap, e.g. in DDP) ``network``. The logits returned are the STD
    path's, so the loop's train accuracy stays the ordinary one; the CSG path's accuracy and
    losses, the gate's density and which path an epoch trained are reported by
    :meth:`epoch_metrics`, which also ends the epoch (``network.epochs_done += 1``).
    """

    def __init__(
        self,
        network: CSGNetwork,
        *,
        schedule: Schedule = "alternate",
        alternate: Alternate = Alternate(),
        lam_ce: float = 1.0,
        lam_l1: float = 0.05,
        target_density: float = 0.1,
        clip: Clip = "clamp",
        label_smoothing: float = 0.0,
    ) -> None:
        if schedule not in SCHEDULES:
            raise UserError(f"unknown CSG schedule '{schedule}'",
                            f"use one of {', '.join(SCHEDULES)}")
        if clip not in CLIPS:
            raise UserError(f"unknown gate clip '{clip}'", f"use one of {', '.join(CLIPS)}")
        if lam_ce < 0 or lam_l1 < 0 or not 0 <= target_density <= 1:
            raise UserError(f"bad CSG weights: lam_ce {lam_ce}, lam_l1 {lam_l1}, target density "
                            f"{target_density}", "use lam_ce, lam_l1 >= 0 and a density in [0, 1]")
        self.network, self.schedule, self.alternate = network, schedule, alternate
        self.lam_ce, self.lam_l1 = float(lam_ce), float(lam_l1)
        self.target_density, self.clip = float(target_density), clip
        self.label_smoothing = float(label_smoothing)
        self._reset()

    @property
    def epoch(self) -> int:
        return int(self.network.epochs_done)

    def csg_epoch(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) trains the CSG path."""
        if self.schedule == "joint":
            return True
        return self.alternate.is_csg(self.epoch if epoch is None else epoch)

    def __call__(self, model: nn.Module, inputs: Tensor,
                 labels: Tensor) -> tuple[Tensor, Tensor]:
        self.network.project_(self.clip)
        if not self.csg_epoch():
            logits = model(inputs)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            self._record(n=labels.shape[0], std_ce=loss)
            return loss, logits
        logits, gated = model(inputs, labels)
        csg_ce = F.cross_entropy(gated, labels, label_smoothing=self.label_smoothing)
        hinge = sparsity(self.network.gate, self.target_density)
        loss = self.lam_ce * csg_ce + self.lam_l1 * hinge
        std_ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if self.schedule == "joint":
            loss = loss + std_ce
        hits = (gated.detach().argmax(dim=1) == labels).sum()
        self._record(n=labels.shape[0], std_ce=std_ce, csg_ce=csg_ce, csg_hits=hits)
        return loss, logits

    def _reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._seen = {"std": 0, "csg": 0}

    def _record(self, n: int, std_ce: Tensor, csg_ce: Tensor | None = None,
                csg_hits: Tensor | None = None) -> None:
        def add(name: str, value: float) -> None:
            self._sums[name] = self._sums.get(name, 0.0) + value

        add("std_ce", float(std_ce.detach()) * n)
        self._seen["std"] += n
        if csg_ce is not None and csg_hits is not None:
            add("csg_ce", float(csg_ce.detach()) * n)
            add("csg_top1", float(csg_hits))
            self._seen["csg"] += n

    def epoch_metrics(self) -> dict[str, float]:
        """This epoch's ``csg_epoch`` (1/0), ``std_ce``, ``csg_ce``, ``csg_top1`` (train, CSG
        path), ``gate_density`` and ``gate_hinge``; then the next epoch starts."""
        gate = self.network.project_(self.clip)
        out: dict[str, float] = {"csg_epoch": float(self.csg_epoch())}
        if self._seen["std"]:
            out["std_ce"] = self._sums["std_ce"] / self._seen["std"]
        if self._seen["csg"]:
            out["csg_ce"] = self._sums["csg_ce"] / self._seen["csg"]
            out["csg_top1"] = self._sums["csg_top1"] / self._seen["csg"]
        out["gate_density"] = density(gate)
        out["gate_hinge"] = float(sparsity(gate, self.target_density))
        self._reset()
        self.network.epochs_done += 1
        return out


def csg_topk(gate: Tensor, k: int, order: GateOrder = "largest") -> ClassIndices:
    """Each class's ``k`` channels by gate value, from a ``(C, D)`` gate.

    ``largest`` (default): the ``k`` largest gates, ties to the lower channel id. ``upstream``
    reproduces a bug of the original code (an ascending ``argsort``): the ``k`` *smallest*
    gates, the channels the class relies on least; use it only to reproduce upstream figures.
    """
    if order not in ORDERS:
        raise UserError(f"unknown gate order '{order}'", f"use one of {', '.join(ORDERS)}")
    if gate.ndim != 2:
        raise UserError(f"a CSG gate must be a (classes, channels) matrix, got shape "
                        f"{tuple(gate.shape)}", "pass the gate of a CSG checkpoint")
    values = gate.detach().cpu().double()
    num_classes, num_channels = values.shape
    if not 1 <= k <= num_channels:
        raise UserError(f"k must be between 1 and the {num_channels} channels, got {k}",
                        "pass a valid --csg-k")
    if order == "largest":
        rows = [rank_desc(values[c])[:k] for c in range(num_classes)]
    else:
        rows = [[int(j) for j in torch.argsort(values[c], stable=True)[:k]]
                for c in range(num_classes)]
    return ClassIndices(rows, num_channels, {"source": "csg", "order": order, "k": k})


# -- checkpoints -------------------------------------------------------------------------------

@dataclass
class LoadedCSG:
    """A CSG-trained network (the STD path, in eval mode), its ``(C, D)`` gate and card."""

    model: nn.Module
    gate: Tensor
    card: Any = None


GATE_NAMES = (GATE_KEY, "gate", "csg")


def load_csg(path: str | Path, name: str | None = None) -> LoadedCSG:
    """Read a CSG checkpoint: narrows' ``csg.pt`` (the network with its card and the gate under
    ``csg_gate``), a ``csg-train`` run's ``last.pt``/``best.pt``, or a third-party file whose
    weights hold the gate under ``csg``/``gate`` (an official ``(D, C)`` gate is transposed).

    A file holding numpy scalars (e.g. a training metadata entry) is read with those numpy
    types allow-listed, never with arbitrary unpickling. A checkpoint without a narrows card
    needs ``name`` (the architecture). No gate, or one that does not fit the network, is a
    :class:`UserError`.
    """
    from narrows.models import ModelCard, create, load_state_dict_strict

    ckpt = _read_allowing_numpy(path)
    state = dict(ckpt.state_dict)
    gate = _pop_gate(state, ckpt.extra)
    if gate is None:
        raise UserError(f"checkpoint {path} holds no CSG gate (no '{GATE_KEY}', 'gate' or "
                        "'csg' entry)", "pass the csg.pt written by 'narrows decompose csg-train'")
    if "gate_flat" in ckpt.state_dict:  # a csg-train run's loop checkpoint: net.* keys
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    card: ModelCard | None = ckpt.card
    arch = card.architecture if card is not None else name
    if arch is None:
        raise UserError(f"checkpoint {path} has no narrows model card, so its architecture is "
                        "unknown", "pass --model NAME (e.g. resnet20_cifar)")
    if card is not None:
        model = create(arch, num_classes=card.num_classes, in_chans=card.in_chans,
                       **card.model_kwargs)
    else:
        from narrows.models import infer_sizes

        classes, chans = infer_sizes(arch, state)
        model = create(arch, num_classes=classes, in_chans=chans)
    load_state_dict_strict(model, state, str(path), name=arch)
    model.eval()
    _, linear = split_head(model)
    shape = (linear.out_features, linear.in_features)
    if gate.ndim == 1 and gate.numel() == shape[0] * shape[1]:
        gate = gate.view(shape)
    elif gate.ndim == 2 and tuple(gate.shape) == shape[::-1] and shape[0] != shape[1]:
        gate = gate.t()  # the official code stores the gate as (channels, classes)
    if tuple(gate.shape) != shape:
        raise UserError(f"the CSG gate in {path} has shape {tuple(gate.shape)} but the network "
                        f"needs {shape} (classes, channels)", "pass a gate saved with its network")
    return LoadedCSG(model, gate.detach().float().contiguous(), card)


def _pop_gate(state: dict[str, Tensor], extra: Mapping[str, Any]) -> Tensor | None:
    if "gate_flat" in state:
        state.pop("epochs_done", None)
        return state.pop("gate_flat")
    for key in GATE_NAMES:
        value = extra.get(key)
        if isinstance(value, Tensor):
            return value
    for key in list(state):
        if key in GATE_NAMES or key.rsplit(".", 1)[-1] == "csg":
            return state.pop(key)
    return None


def _read_allowing_numpy(path: str | Path):
    """``read_checkpoint`` with numpy scalar and dtype types allowed by the unpickler."""
    import numpy as np

    from narrows.models import read_checkpoint

    allowed: list[Any] = [np.dtype]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            allowed.append(__import__(module, fromlist=["scalar"]).scalar)
            break
        except (ImportError, AttributeError):
            continue
    allowed += [t for t in vars(getattr(np, "dtypes", object)).values() if isinstance(t, type)]
    with torch.serialization.safe_globals(allowed):
        return read_checkpoint(path)


def save_csg(path: str | Path, network: CSGNetwork, card: Any,
             settings: Mapping[str, Any] | None = None) -> Path:
    """Write ``network.net`` with its card, the ``(C, D)`` gate under ``csg_gate`` and the
    training ``settings``: loadable by ``load_model`` (the network) and :func:`load_csg`."""
    from narrows.models import save_model

    extra: dict[str, Any] = {GATE_KEY: network.gate.detach().cpu().clone()}
    if settings:
        extra["csg_settings"] = dict(settings)
    return save_model(path, network.net, card, extra)


# -- comparing with CSG -------------------------------------------------------------------------

ORDER_CHOICES = ("largest", "upstream", "both")


def csg_orders(choice: str) -> list[tuple[str, GateOrder]]:
    """``(result name, gate order)`` pairs for an order choice: ``largest`` (``csg``),
    ``upstream`` (``csg-upstream``) or ``both``."""
    pairs: dict[str, tuple[str, GateOrder]] = {"largest": ("csg", "largest"),
                                               "upstream": ("csg-upstream", "upstream")}
    if choice not in ORDER_CHOICES:
        raise UserError(f"unknown gate order choice '{choice}'",
                        f"use one of {', '.join(ORDER_CHOICES)}")
    return list(pairs.values()) if choice == "both" else [pairs[choice]]


def load_csg_subject(path: str | Path, *, name: str | None = None, data: str | None = None,
                     image_size: int | None = None) -> tuple[LoadedCSG, Any, Any]:
    """``(loaded CSG network, its data bundle, normaliser)`` of the CSG checkpoint at ``path``
    (``name``: its architecture, needed when it has no card; see :func:`load_csg`): the data is
    ``data`` (a spec), else the one its card records, served at ``image_size`` where it can be
    (default: the card's size); a class-count mismatch is a :class:`UserError`."""
    from narrows.models.inputs import data_for_model
    from narrows.training import Normalizer

    loaded = load_csg(path, name=name)
    spec = data or (loaded.card.data_spec if loaded.card else None)
    if not spec:
        raise UserError(f"{path} does not say which data it was trained on",
                        "pass data (a data spec; on the command line --data SPEC)")
    _, linear = split_head(loaded.model)
    classes = linear.out_features
    served = data_for_model(spec, loaded.card, None, image_size=image_size, what=str(path))
    if classes != served.bundle.info.num_classes:
        raise UserError(f"the CSG network predicts {classes} classes but {spec} has "
                        f"{served.bundle.info.num_classes}", "use the data set it was trained on")
    return loaded, served.bundle, Normalizer(served.mean, served.std)


def plot_gate(gate: Tensor, rows: list[dict[str, Any]], class_names: Any = None,
              ax: Any = None) -> tuple[Any, Any]:
    """The gate matrix and its density per epoch (``rows``: training metrics with ``epoch``
    and ``gate_density``); returns ``(fig, (left, right))``. ``ax``: two axes to draw on;
    ``class_names`` label the rows of a gate of at most 20 classes."""
    from narrows.plotting import pyplot

    if ax is None:
        fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.4),
                                               gridspec_kw={"width_ratios": [2, 1]})
    else:
        left, right = ax
        fig = left.figure
    low, high = min(0.0, float(gate.min())), float(gate.max())
    image = left.imshow(gate.numpy(), aspect="auto", cmap="viridis", vmin=low,
                        vmax=high if high > low else low + 1.0)
    left.set_xlabel("channel")
    left.set_ylabel("class")
    if gate.shape[0] <= 20:
        names = list(class_names or [])
        shown = names if len(names) == gate.shape[0] else list(range(gate.shape[0]))
        left.set_yticks(range(gate.shape[0]), [str(n) for n in shown], fontsize=8)
    left.set_title("CSG gate", fontsize=9)
    fig.colorbar(image, ax=left)
    epochs = [r["epoch"] for r in rows if "gate_density" in r]
    right.plot(epochs, [r["gate_density"] for r in rows if "gate_density" in r], marker="o")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("epoch")
    right.set_ylabel("gate density |G|₁ / (C·D)")
    right.grid(alpha=0.3)
    fig.tight_layout()
    return fig, (left, right)
