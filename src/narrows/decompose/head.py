"""The decomposed final layer: each class reads only its own influential channels.

For class c with channels ``I_c``, ``z_c = Σ_t V[c, t] · h[I_c[t]] + b'_c``, with ``V`` gathered
from the original weights (``V[c, t] = W[c, I_c[t]]``) and ``b'`` a copy of ``b``. The logits are
computed as ``F.linear(h, W_V, b')`` where ``W_V`` scatters ``V`` into a zero ``C×D`` matrix, so
before training the decomposed head *is* the masked linear map ``(W ⊙ M) h + b`` bit for bit,
and with every channel kept it is the original layer bit for bit.

A decomposed checkpoint records the indices in its state dict (the ``index`` and ``keep``
buffers of the head), next to ``V``, ``b'`` and the original ``W, b``; :func:`load_decomposed`
rebuilds it strictly from that alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.decompose.indices import ClassIndices
from narrows.decompose.parts import Features, classifier_name, replace_classifier, split_head
from narrows.errors import UserError

EXTRA_KEY = "decompose"


class DecomposedLinear(nn.Module):
    """The decomposed head built from ``linear`` and ``indices``.

    Trainable: ``V`` (``C×k``; rows padded with fixed zeros where classes have fewer channels)
    and ``bias`` (``b'``). Kept for reference, frozen and unused by ``forward``: ``full`` (the
    original layer ``W, b``). Buffers: ``index`` (``C×k`` channel ids) and ``keep`` (which
    entries are real).
    """

    def __init__(self, linear: nn.Linear, indices: ClassIndices) -> None:
        super().__init__()
        classes, width = linear.out_features, linear.in_features
        if indices.num_classes != classes:
            raise UserError(
                f"the indices are for {indices.num_classes} classes, but the model has {classes}",
                "extract indices for this model and data set",
            )
        if indices.num_channels != width:
            raise UserError(
                f"the indices are for {indices.num_channels} channels, but the model's final "
                f"layer reads {width}",
                "extract indices for this model's last feature layer",
            )
        longest = max(len(row) for row in indices.indices)
        index = torch.zeros(classes, longest, dtype=torch.int64)
        keep = torch.zeros(classes, longest, dtype=torch.bool)
        for c, row in enumerate(indices.indices):
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
    def indices(self) -> ClassIndices:
        """The class → channel map this head was built with."""
        rows = [
            [int(j) for j, kept in zip(r, m, strict=True) if kept]
            for r, m in zip(self.index.tolist(), self.keep.tolist(), strict=True)
        ]
        return ClassIndices(rows, self.in_features)

    def effective_weight(self) -> Tensor:
        """``W_V``: the ``C×D`` matrix with ``V`` at the kept channels and zeros elsewhere."""
        zeros = torch.zeros(
            self.out_features, self.in_features, dtype=self.V.dtype, device=self.V.device
        )
        return zeros.scatter_add(1, self.index, self.V * self.keep)

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.index.shape[1]}"


def decompose(model: nn.Module, indices: ClassIndices, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with its final linear layer decomposed.

    The model's head must be global pooling followed by ``nn.Linear`` (see :func:`split_head`);
    indices for another number of classes or channels are a :class:`UserError`.
    """
    target = model if inplace else copy.deepcopy(model)
    _, linear = split_head(target)
    return replace_classifier(target, DecomposedLinear(linear, indices))


def find_decomposed(model: nn.Module) -> DecomposedLinear | None:
    """The model's decomposed head, or ``None`` when its head is not decomposed."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, DecomposedLinear) else None


def decomposed_parts(model: nn.Module) -> tuple[Features, DecomposedLinear]:
    """``(features, head)`` of a decomposed model, like :func:`split_head` for plain ones."""
    head = find_decomposed(model)
    if head is None:
        raise UserError(f"{type(model).__name__}'s head is not decomposed", "decompose it first")

    def features(x: Tensor) -> Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]

    return features, head


@dataclass
class LoadedDecomposed:
    """A decomposed model rebuilt from a checkpoint, in eval mode on the CPU."""

    model: nn.Module
    indices: ClassIndices
    card: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def is_decomposed_state(model: nn.Module, state_dict: dict[str, Tensor]) -> bool:
    """Whether ``state_dict`` holds a decomposed head for ``model``'s classifier."""
    prefix = classifier_name(model)
    return f"{prefix}.index" in state_dict and f"{prefix}.V" in state_dict


def load_decomposed(checkpoint: str | Path, *, name: str | None = None) -> LoadedDecomposed:
    """Rebuild a decomposed model from ``checkpoint`` (its card, or ``name`` without one) and
    load it strictly; the indices come from the head's ``index``/``keep`` buffers.

    A checkpoint without a decomposed head, or whose recorded indices disagree with the buffers,
    is a :class:`UserError`.
    """
    from narrows.models import create, read_checkpoint
    from narrows.models.strict import load_state_dict_strict

    ckpt = read_checkpoint(checkpoint)
    card = ckpt.card
    if card is not None:
        arch = card.architecture
        model = create(arch, num_classes=card.num_classes, in_chans=card.in_chans,
                       **card.model_kwargs)
    elif name is not None:
        arch = name
        model = _bare_model(name, ckpt.state_dict)
    else:
        raise UserError(
            f"checkpoint {checkpoint} has no narrows model card, so its architecture is unknown",
            "pass --model NAME",
        )
    prefix = classifier_name(model)
    if not is_decomposed_state(model, ckpt.state_dict):
        raise UserError(
            f"checkpoint {checkpoint} has no decomposed head ({prefix}.V and {prefix}.index)",
            "pass a checkpoint written by 'narrows decompose finetune', or the plain model "
            "with --indices",
        )
    index = ckpt.state_dict[f"{prefix}.index"]
    keep = ckpt.state_dict.get(f"{prefix}.keep", torch.ones_like(index, dtype=torch.bool))
    rows = [
        [int(j) for j, kept in zip(r, m, strict=True) if kept]
        for r, m in zip(index.tolist(), keep.tolist(), strict=True)
    ]
    _, linear = split_head(model)
    indices = ClassIndices(rows, linear.in_features)
    recorded = ckpt.extra.get(EXTRA_KEY)
    if isinstance(recorded, dict) and "indices" in recorded:
        saved = ClassIndices.from_json(recorded, source=f"checkpoint {checkpoint}")
        if [sorted(r) for r in saved.indices] != [sorted(r) for r in indices.indices]:
            raise UserError(
                f"checkpoint {checkpoint}: the recorded indices disagree with the head's buffers",
                "the file was edited or damaged; fine-tune again",
            )
        indices = ClassIndices(indices.indices, indices.num_channels, saved.meta)
    model = decompose(model, indices, inplace=True)
    load_state_dict_strict(model, ckpt.state_dict, str(checkpoint), name=arch)
    model.eval()
    return LoadedDecomposed(model, indices, card, ckpt.extra)


def _bare_model(name: str, state_dict: dict[str, Tensor]) -> nn.Module:
    from narrows.models import create
    from narrows.models.registry import head_and_stem

    head, stem = head_and_stem(name)
    full = state_dict.get(f"{head}.full.weight") if head else None
    first = state_dict.get(f"{stem}.weight") if stem else None
    return create(
        name,
        num_classes=int(full.shape[0]) if full is not None else None,
        in_chans=int(first.shape[1]) if first is not None and first.ndim == 4 else None,
    )


def decomposed_extra(indices: ClassIndices) -> dict[str, Any]:
    """The checkpoint entry that records the indices (wrapped JSON form) beside the weights."""
    return {EXTRA_KEY: indices.to_json()}
