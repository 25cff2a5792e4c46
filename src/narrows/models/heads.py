"""A classifier's head: which module it is, and the features it reads.

Any model whose classifier is its last ``nn.Linear`` splits into ``features(x) -> (N, D)`` (the
input of that layer, caught by a forward pre-hook that stops the forward pass there) and the
layer itself, so that ``model(x) == linear(features(x))`` when nothing follows the layer. The
classifier is timm's ``get_classifier()`` when the model has one, else its last registered
``nn.Linear`` (a plain ``nn.Sequential(conv, relu, pool, flatten, linear)`` or a user's own
``nn.Module``). A decomposed head (:mod:`narrows.models.decomposed`) counts as the classifier it
replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.models.layers import run_to

Features = Callable[[Tensor], Tensor]
_NEEDS = "decompose needs a model whose classifier is its last nn.Linear, reading (N, D) features"


def is_head(module: Any) -> bool:
    """Whether ``module`` is a linear classifier: ``nn.Linear`` or a decomposed head."""
    return isinstance(module, nn.Linear) or bool(getattr(module, "is_decomposed_head", False))


def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """``(dotted name, module)`` of ``model``'s classifier.

    timm's ``get_classifier()`` when the model has it (whatever module it returns); otherwise the
    last registered ``nn.Linear`` or decomposed head. A model without one is a
    :class:`UserError`.
    """
    kind = type(model).__name__
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        for name, module in model.named_modules():
            if module is head and name:
                return name, module
        shown = type(head).__name__ if isinstance(head, nn.Module) else repr(head)[:60]
        raise UserError(f"{kind}'s classifier ({shown}) is not one of its layers",
                        "use a model with a single linear classifier")
    found: tuple[str, nn.Module] | None = None
    inside: str | None = None  # a decomposed head's own layers (its frozen copy) are skipped
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        if name and is_head(module):
            found = (name, module)
            inside = name if not isinstance(module, nn.Linear) else None
    if found is None:
        raise UserError(f"{kind} has no nn.Linear layer, so it has no linear classifier", _NEEDS)
    return found


def classifier_name(model: nn.Module) -> str:
    """The dotted module name of ``model``'s classifier (e.g. ``fc``, ``head.fc``, ``4``)."""
    return find_classifier(model)[0]


def head_input(model: nn.Module, module: nn.Module, what: str | None = None) -> Features:
    """``x -> (N, D)``: the input of ``module`` (a layer of ``model``) in ``model(x)``.

    The forward pass stops at ``module``; gradients flow as in ``model(x)``. A forward that never
    reaches ``module``, or reaches it with other than ``(N, D)`` inputs, is a :class:`UserError`.
    """
    kind = type(model).__name__
    width = getattr(module, "in_features", None)
    what = what or "its classifier"

    def features(x: Tensor) -> Tensor:
        out = run_to(model, module, x)
        if out is None:
            raise UserError(f"{kind}'s forward pass never calls {what}", _NEEDS)
        if not isinstance(out, Tensor) or out.ndim != 2 or (width and out.shape[1] != width):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserError(f"{kind}'s classifier reads inputs of shape {shape}, not "
                            f"(N, {width or 'D'})", _NEEDS)
        return out

    return features


def split_head(model: nn.Module) -> tuple[Features, nn.Linear]:
    """``(features, linear)``: ``features(x)`` is the ``(N, D)`` input of the final linear layer,
    so that ``model(x) == linear(features(x))`` in eval mode when nothing follows the layer.

    A model without a linear classifier (none, a conv or MLP head, two heads, or one that is
    decomposed already) is a :class:`UserError`.
    """
    name, linear = find_classifier(model)
    if not isinstance(linear, nn.Linear):
        kind = "decomposed already" if is_head(linear) else f"{type(linear).__name__}"
        raise UserError(f"{type(model).__name__}'s classifier ({name}) is {kind}, not one "
                        "linear layer", _NEEDS)
    return head_input(model, linear, f"its classifier {name}"), linear


def replace_classifier(model: nn.Module, head: nn.Module) -> nn.Module:
    """Put ``head`` where ``model``'s classifier was (in place); returns ``model``."""
    parent_name, _, attr = classifier_name(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, head)
    return model


def pooled_features(model: nn.Module) -> Features:
    """``x -> (N, D)``: the pooled features the classifier reads (its flattened input), or
    timm's pre-logits for a model without a linear classifier (``num_classes=0``)."""
    try:
        name, head = find_classifier(model)
        if is_head(head):
            return head_input(model, head, f"its classifier {name}")
    except UserError:
        pass
    if callable(getattr(model, "forward_features", None)) and callable(
        getattr(model, "forward_head", None)
    ):
        def timm_features(x: Tensor) -> Tensor:
            out = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
            return out.flatten(1)

        return timm_features
    raise UserError(f"{type(model).__name__} has no nn.Linear classifier whose input could be "
                    "taken as its features", "use a model whose classifier is its last nn.Linear")


@torch.no_grad()
def check_split(model: nn.Module, x: Tensor, atol: float = 1e-5) -> None:
    """Raise :class:`UserError` unless ``model(x) == linear(features(x))`` (eval mode assumed),
    to absolute tolerance ``atol`` (and relative 1e-4)."""
    features, linear = split_head(model)
    full = model(x)
    split = linear(features(x))
    if full.shape != split.shape or not torch.allclose(full, split, atol=atol, rtol=1e-4):
        raise UserError(
            f"{type(model).__name__}'s output is not its last linear layer applied to the "
            "features it reads", _NEEDS)
