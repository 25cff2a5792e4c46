"""The CIFAR ResNets of He et al. (2016) with the parameter-free "option A" shortcut.

Module names follow the widely shared akamaster checkpoints (``conv1, bn1,
layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,shortcut}, linear``), so their state dicts load strictly
once the ``module.`` prefix is stripped. ``fc`` is an alias of ``linear`` that adds no keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from narrows.models.cifar_common import CifarNet, check_int, cifar_cfg, entry_kwargs, instance_cfg

DEPTHS = (20, 32, 44, 56, 110)
WIDTHS = (16, 32, 64)
_BASE_CFG = cifar_cfg(first_conv="conv1", classifier="linear", pool_size=(8, 8))


class PadShortcut(nn.Module):
    """Option-A shortcut: take every second pixel, then zero-pad channels equally on both sides.

    It has no parameters. Going from ``in_planes`` to ``planes = 2 * in_planes`` channels it pads
    ``planes // 4`` zero channels before and after the input's channels.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes != in_planes + 2 * (planes // 4):
            raise ValueError(f"option-A shortcut cannot map {in_planes} to {planes} channels")
        self.stride = stride
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(CifarNet):
    """ResNet-``depth`` for small images (``depth = 6n + 2``) with timm's model interface.

    ``forward_features`` returns the last block's output after its ReLU (``B×64×H/4×W/4``);
    ``forward_head`` average-pools it and applies ``linear``. ``num_classes=0`` gives no head.
    ``drop_rate`` adds dropout before ``linear`` (0 by default, as upstream; it has no weights).
    ``in_chans``: input channels.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        super().__init__(
            num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
            num_features=WIDTHS[-1], head_hidden_size=WIDTHS[-1],
            cfg=instance_cfg(_BASE_CFG, architecture=f"resnet{depth}_cifar",
                             num_classes=num_classes, in_chans=in_chans))
        blocks = (depth - 2) // 6
        self.depth = depth

        self.conv1 = nn.Conv2d(in_chans, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        in_planes = WIDTHS[0]
        stages = []
        for index, planes in enumerate(WIDTHS):
            layers = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.head_drop = nn.Dropout(drop_rate)
        self.linear: nn.Module = self._new_head(num_classes)
        self.apply(_kaiming_init)

    # ``fc`` is a view of ``linear``: reading or assigning it uses ``linear``; no extra state keys.
    @property
    def fc(self) -> nn.Module:
        return self.linear

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__("linear" if name == "fc" else name, value)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def _install_head(self, head: nn.Module) -> None:
        head.apply(_kaiming_init)
        self.linear = head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a freshly initialised one (``global_pool`` must be avg or None)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"CIFAR ResNet only pools by average, got global_pool={global_pool!r}")
        super().reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.linear(x)


def _kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal (fan_in, ReLU gain) on conv and linear weights; biases keep their default."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


default_cfgs = generate_default_cfgs({f"resnet{d}_cifar": dict(_BASE_CFG) for d in DEPTHS})

_ACCEPTED = ("num_classes", "in_chans", "drop_rate")


def _create(depth: int, pretrained: bool, kwargs: dict[str, Any]) -> CifarResNet:
    name = f"resnet{depth}_cifar"
    args = entry_kwargs(name, pretrained, kwargs, _ACCEPTED)
    num_classes = check_int(name, "num_classes", args.get("num_classes", 10), 0)
    in_chans = check_int(name, "in_chans", args.get("in_chans", 3), 1)
    return CifarResNet(depth, num_classes, in_chans, float(args.get("drop_rate", 0.0)))


def _entry_point(depth: int, parameters: str) -> Callable[..., CifarResNet]:
    """Register timm's entry point ``resnet{depth}_cifar`` (``parameters``: the count with 10
    classes, for its docstring)."""

    def entry(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
        return _create(depth, pretrained, kwargs)

    entry.__name__ = entry.__qualname__ = f"resnet{depth}_cifar"
    entry.__doc__ = (f"ResNet-{depth} for CIFAR (option A), {parameters} parameters with 10 "
                     "classes.")
    return register_model(entry)


resnet20_cifar = _entry_point(20, "269,722")
resnet32_cifar = _entry_point(32, "464,154")
resnet44_cifar = _entry_point(44, "658,586")
resnet56_cifar = _entry_point(56, "853,018")
resnet110_cifar = _entry_point(110, "1,727,962")
