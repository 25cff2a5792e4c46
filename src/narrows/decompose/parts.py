"""A model split into its pooled features and its final linear layer (timm's interface).

For a timm model, ``forward_features`` gives the last feature map, ``forward_head(x,
pre_logits=True)`` the pooled vector the classifier reads, and ``get_classifier()`` that
classifier. narrows' CIFAR ResNets and AlexNet follow the same interface.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from narrows.errors import UserError

Features = Callable[[Tensor], Tensor]


def split_head(model: nn.Module) -> tuple[Features, nn.Linear]:
    """``(features, linear)``: ``features(x)`` is the pooled pre-head ``(N, D)`` tensor, so that
    ``model(x) == linear(features(x))`` in eval mode.

    A model without timm's ``forward_features``/``forward_head``/``get_classifier`` or whose
    classifier is not one ``nn.Linear`` (no head, a conv or MLP head, two heads) is a
    :class:`UserError`.
    """
    name = type(model).__name__
    for method in ("forward_features", "forward_head", "get_classifier"):
        if not callable(getattr(model, method, None)):
            raise UserError(
                f"{name} has no {method}(), so its pooled features cannot be separated from its head",
                "use a timm model (or one with timm's forward_features/forward_head interface)",
            )
    linear = model.get_classifier()  # type: ignore[operator]
    if not isinstance(linear, nn.Linear):
        kind = type(linear).__name__ if isinstance(linear, nn.Module) else repr(linear)
        raise UserError(
            f"{name}'s classifier is a {kind}, not one linear layer after global pooling",
            "decompose needs a model whose head is global pooling followed by nn.Linear",
        )

    def features(x: Tensor) -> Tensor:
        out = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        if out.ndim != 2 or out.shape[1] != linear.in_features:
            raise UserError(
                f"{name}'s pre-logits have shape {tuple(out.shape)}, not (N, {linear.in_features})",
                "decompose needs a model whose head is global pooling followed by nn.Linear",
            )
        return out

    return features, linear


def classifier_name(model: nn.Module) -> str:
    """The dotted module name of ``model.get_classifier()`` (e.g. ``linear``, ``head.fc``)."""
    _, linear = split_head(model)
    for name, module in model.named_modules():
        if module is linear and name:
            return name
    raise UserError(  # pragma: no cover - get_classifier returns a submodule in timm
        f"{type(model).__name__}'s classifier is not one of its submodules", ""
    )


def replace_classifier(model: nn.Module, head: nn.Module) -> nn.Module:
    """Put ``head`` where ``model``'s classifier was (in place); returns ``model``."""
    parent_name, _, attr = classifier_name(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, head)
    return model


@torch.no_grad()
def check_split(model: nn.Module, x: Tensor, atol: float = 1e-5) -> None:
    """Raise :class:`UserError` unless ``model(x) == linear(features(x))`` (eval mode assumed)."""
    features, linear = split_head(model)
    full = model(x)
    split = linear(features(x))
    if full.shape != split.shape or not torch.allclose(full, split, atol=atol, rtol=1e-4):
        raise UserError(
            f"{type(model).__name__}'s output is not its linear head applied to its pooled features",
            "decompose needs a model whose head is global pooling followed by nn.Linear",
        )
