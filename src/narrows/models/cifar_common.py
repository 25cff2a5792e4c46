"""What narrows' own CIFAR architectures share: their timm config and entry-point argument checks."""

from __future__ import annotations

from typing import Any

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
