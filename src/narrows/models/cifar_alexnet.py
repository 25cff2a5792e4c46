"""The BatchNorm-free AlexNet-style CIFAR network of the representation-bottleneck paper.

All layers live in one ``nn.Sequential`` called ``all_layers`` whose indices match the published
"our_alexnet" code, so its checkpoints load strictly. Layers 0–12 are the convolutional trunk
(``forward_features``), 13–19 the head (flatten, dropout, FC, ReLU, dropout, FC, ReLU, FC).
Weights keep PyTorch's default initialisation, as upstream.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from narrows.models.cifar_common import CifarNet, check_int, cifar_cfg, entry_kwargs, instance_cfg

TRUNK_END = 13  # all_layers[:13] is the trunk, all_layers[13:] the head
CLASSIFIER_INDEX = 19
_BASE_CFG = cifar_cfg(
    first_conv="all_layers.0",
    classifier=f"all_layers.{CLASSIFIER_INDEX}",
    pool_size=(4, 4),
    fixed_input_size=True,
)


def _pooled(size: int) -> int:
    """Side length after ``MaxPool2d(3, stride=2, padding=1)``."""
    return (size - 1) // 2 + 1


class CifarAlexNet(CifarNet):
    """AlexNet for ``img_size``×``img_size`` images (32 by default → a 256×4×4 feature map).

    ``forward_features`` returns the last conv feature map after its max-pool;
    ``forward_head(x, pre_logits=True)`` returns the ``hidden``-d (512) input of the last linear
    layer. ``num_classes`` logits, ``in_chans`` input channels; ``drop_rate`` is the dropout
    before each of the two hidden linear layers.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.5,
        img_size: int = 32,
        hidden: int = 512,
    ) -> None:
        super().__init__(
            num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, num_features=256,
            head_hidden_size=hidden,
            cfg=instance_cfg(_BASE_CFG, architecture="alexnet_cifar", num_classes=num_classes,
                             in_chans=in_chans, img_size=img_size))
        side = _pooled(_pooled(_pooled(img_size)))
        self.img_size = img_size
        self.all_layers = nn.Sequential(
            nn.Conv2d(in_chans, 64, kernel_size=7, stride=1, padding=3),  # 0
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),  # 12: end of the trunk
            nn.Flatten(),
            nn.Dropout(drop_rate),
            nn.Linear(256 * side * side, hidden),  # 15
            nn.ReLU(),
            nn.Dropout(drop_rate),
            nn.Linear(hidden, hidden),  # 18
            nn.ReLU(),
            self._new_head(num_classes),  # 19: the classifier
        )

    def get_classifier(self) -> nn.Module:
        return self.all_layers[CLASSIFIER_INDEX]

    def _install_head(self, head: nn.Module) -> None:
        self.all_layers[CLASSIFIER_INDEX] = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_layers[:TRUNK_END](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.all_layers[TRUNK_END : CLASSIFIER_INDEX if pre_logits else None](x)


default_cfgs = generate_default_cfgs({"alexnet_cifar": dict(_BASE_CFG)})


@register_model
def alexnet_cifar(pretrained: bool = False, **kwargs: Any) -> CifarAlexNet:
    """AlexNet for CIFAR without BatchNorm; 4,821,322 parameters with 10 classes at 32×32.

    Options: ``num_classes``, ``in_chans``, ``drop_rate`` (0.5), ``img_size`` (32; sets the size
    of the first linear layer).
    """
    args = entry_kwargs(
        "alexnet_cifar", pretrained, kwargs, ("num_classes", "in_chans", "drop_rate", "img_size")
    )
    return CifarAlexNet(
        num_classes=check_int("alexnet_cifar", "num_classes", args.get("num_classes", 10), 0),
        in_chans=check_int("alexnet_cifar", "in_chans", args.get("in_chans", 3), 1),
        drop_rate=float(args.get("drop_rate", 0.5)),
        img_size=check_int("alexnet_cifar", "img_size", args.get("img_size", 32), 1),
    )
