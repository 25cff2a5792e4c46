"""The decomposed final layer, as a model part the core can rebuild from a checkpoint.

For class c with channels ``I_c``, ``z_c = Σ_t V[c, t] · h[I_c[t]] + b'_c``, with ``V`` gathered
from the original weights (``V[c, t] = W[c, I_c[t]]``) and ``b'`` a copy of ``b``. The logits are
computed as ``F.linear(h, W_V, b')`` where ``W_V`` scatters ``V`` into a zero ``C×D`` matrix, so
before training the decomposed head *is* the masked linear map ``(W ⊙ M) h + b`` bit for bit,
and with every channel kept it is the original layer bit for bit.

The channel ids live in the head's ``index`` and ``keep`` buffers, so a decomposed checkpoint
(``narrows decompose finetune``) carries them in its state dict: :func:`adopt_decomposed_head`
recognises such a state dict by its keys and puts a matching head into a freshly built model, so
that :func:`narrows.models.load_model` (and every command built on it) loads it strictly as the
model it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.models.heads import find_classifier, replace_classifier

EXTRA_KEY = "decompose"  # the checkpoint entry that records the indices as JSON


@dataclass(frozen=True)
class HeadIndices:
    """The channel ids each class of a decomposed head reads (``indices[c]``), out of
    ``num_channels``."""

    indices: list[list[int]]
    num_channels: int

    @property
    def num_classes(self) -> int:
        return len(self.indices)


def _rows(indices: Any) -> tuple[list[list[int]], int | None]:
    """``(rows, D or None)`` of a ``ClassIndices``-like object or a list of rows."""
    rows = getattr(indices, "indices", indices)
    width = getattr(indices, "num_channels", None)
    return [[int(j) for j in row] for row in rows], (None if width is None else int(width))


class DecomposedLinear(nn.Module):
    """The decomposed head built from ``linear`` and ``indices`` (a ``ClassIndices``, a
    :class:`HeadIndices` or a list of each class's channel ids).

    Trainable: ``V`` (``C×k``; rows padded with fixed zeros where classes have fewer channels)
    and ``bias`` (``b'``). Kept for reference, frozen and unused by ``forward``: ``full`` (the
    original layer ``W, b``). Buffers: ``index`` (``C×k`` channel ids) and ``keep`` (which
    entries are real).
    """

    is_decomposed_head: ClassVar[bool] = True

    def __init__(self, linear: nn.Linear, indices: Any) -> None:
        super().__init__()
        classes, width = linear.out_features, linear.in_features
        rows, given_width = _rows(indices)
        if len(rows) != classes:
            raise UserError(
                f"the indices are for {len(rows)} classes, but the model has {classes}",
                "extract indices for this model and data set",
            )
        if given_width is not None and given_width != width:
            raise UserError(
                f"the indices are for {given_width} channels, but the model's final "
                f"layer reads {width}",
                "extract indices for this model's last feature layer",
            )
        bad = [j for row in rows for j in row if not 0 <= j < width]
        if bad:
            raise UserError(f"channel id {bad[0]} is outside the {width} channels the final "
                            "layer reads", "extract indices for this model's last feature layer")
        longest = max((len(row) for row in rows), default=0)
        index = torch.zeros(classes, longest, dtype=torch.int64)
        keep = torch.zeros(classes, longest, dtype=torch.bool)
        for c, row in enumerate(rows):
            index[c, : len(row)] = torch.tensor(row, dtype=torch.int64)
            keep[c, : len(row)] = True
        weight = linear.weight.detach()
        index = index.to(weight.device)
        keep = keep.to(weight.device)
        self.register_buffer("index", index)
        self.register_buffer("keep", keep)
        self.V = nn.Parameter(weight.gather(1, index) * keep)
        self.bias = (
            nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        )
        self.full = copy.deepcopy(linear).requires_grad_(False)
        self.in_features, self.out_features = width, classes

    @property
    def rows(self) -> list[list[int]]:
        """Each class's channel ids, in the order they were given."""
        return [
            [int(j) for j, kept in zip(r, m, strict=True) if kept]
            for r, m in zip(self.index.tolist(), self.keep.tolist(), strict=True)
        ]

    @property
    def indices(self) -> HeadIndices:
        """The class → channel map this head was built with."""
        return HeadIndices(self.rows, self.in_features)

    def effective_weight(self) -> Tensor:
        """``W_V``: the ``C×D`` matrix with ``V`` at the kept channels and zeros elsewhere."""
        zeros = torch.zeros(
            self.out_features, self.in_features, dtype=self.V.dtype, device=self.V.device
        )
        return zeros.scatter_add(1, self.index, self.V * self.keep)

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k={self.index.shape[1]}")


def decompose_head(model: nn.Module, indices: Any, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with its final ``nn.Linear`` decomposed."""
    from narrows.models.heads import split_head

    target = model if inplace else copy.deepcopy(model)
    _, linear = split_head(target)
    return replace_classifier(target, DecomposedLinear(linear, indices))


def find_decomposed(model: nn.Module) -> DecomposedLinear | None:
    """The model's decomposed head, or ``None`` when its head is not decomposed."""
    try:
        _, head = find_classifier(model)
    except UserError:
        return None
    return head if isinstance(head, DecomposedLinear) else None


def decomposed_prefix(model: nn.Module, state_dict: dict[str, Tensor]) -> str | None:
    """The classifier's name when ``state_dict`` holds a decomposed head for it, else ``None``."""
    try:
        prefix, _ = find_classifier(model)
    except UserError:
        return None
    return prefix if f"{prefix}.index" in state_dict and f"{prefix}.V" in state_dict else None


def state_rows(state_dict: dict[str, Tensor], prefix: str) -> list[list[int]]:
    """Each class's channel ids, read from the ``index``/``keep`` buffers under ``prefix``."""
    index = state_dict[f"{prefix}.index"]
    keep = state_dict.get(f"{prefix}.keep", torch.ones_like(index, dtype=torch.bool))
    return [
        [int(j) for j, kept in zip(r, m, strict=True) if kept]
        for r, m in zip(index.tolist(), keep.tolist(), strict=True)
    ]


def adopt_decomposed_head(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> bool:
    """When ``state_dict`` holds a decomposed head for ``model``'s classifier, replace that
    classifier (in place) by a :class:`DecomposedLinear` with the recorded channel ids, ready for
    a strict load; returns whether it did.

    Buffers that do not fit the classifier (another class count, ids out of range) are a
    :class:`UserError`.
    """
    prefix = decomposed_prefix(model, state_dict)
    if prefix is None:
        return False
    _, linear = find_classifier(model)
    if not isinstance(linear, nn.Linear):
        return False
    index = state_dict[f"{prefix}.index"]
    keep = state_dict.get(f"{prefix}.keep", index)
    if index.ndim != 2 or keep.shape != index.shape:
        raise UserError(f"checkpoint {source}: {prefix}.index has shape {tuple(index.shape)}, "
                        "not (classes, k)", "the file is damaged; fine-tune again")
    try:
        head = DecomposedLinear(linear, state_rows(state_dict, prefix))
    except UserError as exc:
        raise UserError(f"checkpoint {source}: its decomposed head does not fit the model: "
                        f"{exc.what}", "rebuild the model the checkpoint was fine-tuned from "
                        "(its card, or --model and --num-classes)") from exc
    replace_classifier(model, head)
    return True


def decomposed_sizes(state_dict: dict[str, Tensor], head: str | None) -> int | None:
    """The class count of a decomposed head's frozen copy (``{head}.full.weight``), if present."""
    weight = state_dict.get(f"{head}.full.weight") if head else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None

