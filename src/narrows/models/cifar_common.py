"""What narrows' own CIFAR architectures share: timm's model interface, their timm config and
entry-point argument checks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from narrows.errors import UserError

CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# Arguments timm's ``create_model`` forwards to every entry point; they do not change the network.
TIMM_PLUMBING = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


def cifar_cfg(*, first_conv: str, classifier: str, **overrides: Any) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` dict for a 32×32 CIFAR network that has no downloadable weights."""
    cfg: dict[str, Any] = {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "mit",
    }
    cfg.update(overrides)
    return cfg


def instance_cfg(
    base: dict[str, Any], *, architecture: str, num_classes: int, in_chans: int, img_size: int = 32
) -> dict[str, Any]:
    """The ``pretrained_cfg`` a built model carries.

    For ``in_chans != 3`` the CIFAR mean and std are averaged over the colour channels and repeated,
    so that timm's data-config helpers get one value per input channel.
    """
    cfg = dict(base, architecture=architecture, num_classes=num_classes)
    cfg["input_size"] = (in_chans, img_size, img_size)
    if in_chans != 3:
        cfg["mean"] = (sum(CIFAR_MEAN) / 3,) * in_chans
        cfg["std"] = (sum(CIFAR_STD) / 3,) * in_chans
    return cfg


def entry_kwargs(
    name: str, pretrained: bool, kwargs: dict[str, Any], accepted: tuple[str, ...]
) -> dict[str, Any]:
    """Check the arguments of a timm entry point and return those the model class takes.

    ``pretrained=True`` and unknown options are :class:`UserError`; timm's plumbing arguments
    (``pretrained_cfg``, ``cache_dir``, ...) and ``None`` values are dropped.
    """
    if pretrained:
        raise UserError(
            f"{name} has no pretrained weights",
            "train one with narrows, or load trained weights with --checkpoint PATH",
        )
    kept = {k: v for k, v in kwargs.items() if k not in TIMM_PLUMBING and v is not None}
    unknown = sorted(set(kept) - set(accepted))
    if unknown:
        raise UserError(
            f"{name} does not take the option(s) {', '.join(unknown)}",
            f"remove them; it takes {', '.join(accepted)}",
        )
    return kept


def check_int(name: str, key: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an integer ``>= minimum``, else raise :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(
            f"{name}: {key} must be an integer >= {minimum}, got {value!r}",
            f"pass a valid {key}",
        )
    return value


class CifarNet(nn.Module):
    """timm's model interface over a subclass's trunk (``forward_features``) and head
    (``forward_head``): ``num_classes``, ``in_chans``, ``drop_rate``, ``num_features`` (channels
    of the feature map), ``head_hidden_size`` (inputs of the last linear layer),
    ``pretrained_cfg``; ``get_classifier`` / ``reset_classifier`` through the subclass's
    ``_install_head``."""

    def __init__(self, *, num_classes: int, in_chans: int, drop_rate: float, num_features: int,
                 head_hidden_size: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = num_features
        self.head_hidden_size = head_hidden_size
        self.pretrained_cfg = self.default_cfg = cfg

    def _new_head(self, num_classes: int) -> nn.Module:
        """A freshly initialised last linear layer (identity for ``num_classes=0``)."""
        if num_classes > 0:
            return nn.Linear(self.head_hidden_size, num_classes)
        return nn.Identity()

    def _install_head(self, head: nn.Module) -> None:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        raise NotImplementedError

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the last linear layer by a freshly initialised one with ``num_classes``
        outputs (``global_pool`` is checked by subclasses that pool)."""
        self.num_classes = num_classes
        self._install_head(self._new_head(num_classes))
        self.pretrained_cfg = self.default_cfg = dict(self.pretrained_cfg, num_classes=num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
