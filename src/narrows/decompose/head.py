"""The decomposed final layer: each class reads only its own influential channels.

For class c with channels ``I_c``, ``z_c = Σ_t V[c, t] · h[I_c[t]] + b'_c``, with ``V`` gathered
from the original weights (``V[c, t] = W[c, I_c[t]]``) and ``b'`` a copy of ``b``; see
:class:`narrows.models.decomposed.DecomposedLinear`, which lives in the core so that every tool
loads a decomposed checkpoint as the model it is.

A decomposed checkpoint records the indices in its state dict (the ``index`` and ``keep``
buffers of the head), next to ``V``, ``b'`` and the original ``W, b``; :func:`load_decomposed`
rebuilds it strictly from that alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from narrows.decompose.indices import ClassIndices
from narrows.errors import UserError
from narrows.models.decomposed import (
    EXTRA_KEY,
    DecomposedLinear,
    decomposed_prefix,
    find_decomposed,
)
from narrows.models.heads import (
    Features,
    find_classifier,
    head_input,
    replace_classifier,
    split_head,
)

__all__ = ["EXTRA_KEY", "DecomposedLinear", "LoadedDecomposed", "decompose", "decomposed_extra",
           "decomposed_parts", "find_decomposed", "head_indices", "is_decomposed_state",
           "load_decomposed"]


def decompose(model: nn.Module, indices: Any, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with its final linear layer decomposed.

    ``indices`` is a :class:`ClassIndices`, or an :class:`~narrows.decompose.Extraction` (its
    chosen indices). The model's classifier must be its last ``nn.Linear`` (see
    :func:`split_head`); indices for another number of classes or channels are a
    :class:`UserError`.
    """
    if not isinstance(indices, ClassIndices) and hasattr(indices, "chosen"):
        indices = indices.chosen()
    if callable(indices) and not isinstance(indices, ClassIndices):  # ex.indices, not ex.indices()
        indices = indices()
    if not isinstance(indices, ClassIndices):
        raise UserError(f"indices are a {type(indices).__name__}, not ClassIndices",
                        "pass ClassIndices.load(path), extraction.indices() or the extraction")
    target = model if inplace else copy.deepcopy(model)
    _, linear = split_head(target)
    return replace_classifier(target, DecomposedLinear(linear, indices))


def head_indices(head: DecomposedLinear) -> ClassIndices:
    """The class → channel map of a decomposed head, as :class:`ClassIndices`."""
    return ClassIndices(head.rows, head.in_features)


def decomposed_parts(model: nn.Module) -> tuple[Features, DecomposedLinear]:
    """``(features, head)`` of a decomposed model, like :func:`split_head` for plain ones."""
    head = find_decomposed(model)
    if head is None:
        raise UserError(f"{type(model).__name__}'s head is not decomposed", "decompose it first")
    name, _ = find_classifier(model)
    return head_input(model, head, f"its classifier {name}"), head


@dataclass
class LoadedDecomposed:
    """A decomposed model rebuilt from a checkpoint, in eval mode on the CPU."""

    model: nn.Module
    indices: ClassIndices
    card: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def is_decomposed_state(model: nn.Module, state_dict: dict[str, Tensor]) -> bool:
    """Whether ``state_dict`` holds a decomposed head for ``model``'s classifier."""
    return decomposed_prefix(model, state_dict) is not None


def load_decomposed(checkpoint: str | Path, *, name: str | None = None) -> LoadedDecomposed:
    """Rebuild a decomposed model from ``checkpoint`` (its card, or ``name`` without one) and
    load it strictly, as :func:`narrows.models.load_model` does; the indices come from the head's
    ``index``/``keep`` buffers.

    A checkpoint without a decomposed head, or whose recorded indices disagree with the buffers,
    is a :class:`UserError`.
    """
    from narrows.models import load_model

    loaded = load_model(checkpoint, name=name)
    head = find_decomposed(loaded.model)
    if head is None:
        prefix = find_classifier(loaded.model)[0]
        raise UserError(
            f"checkpoint {checkpoint} has no decomposed head ({prefix}.V and {prefix}.index)",
            "pass a checkpoint written by 'narrows decompose finetune', or the plain model "
            "with --indices",
        )
    indices = head_indices(head)
    recorded = loaded.extra.get(EXTRA_KEY)
    if isinstance(recorded, dict) and "indices" in recorded:
        saved = ClassIndices.from_json(recorded, source=f"checkpoint {checkpoint}")
        if [sorted(r) for r in saved.indices] != [sorted(r) for r in indices.indices]:
            raise UserError(
                f"checkpoint {checkpoint}: the recorded indices disagree with the head's buffers",
                "the file was edited or damaged; fine-tune again",
            )
        indices = ClassIndices(indices.indices, indices.num_channels, saved.meta)
    return LoadedDecomposed(loaded.model, indices, loaded.card, loaded.extra)


def decomposed_extra(indices: ClassIndices) -> dict[str, Any]:
    """The checkpoint entry that records the indices (wrapped JSON form) beside the weights."""
    return {EXTRA_KEY: indices.to_json()}
