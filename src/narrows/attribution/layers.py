"""Finding the layer a bottleneck is attached to, and running a model only up to it.

Layers are addressed by their dotted name in ``model.named_modules()`` (``"layer2"``,
``"features.17"``, ``"stages.1"``, ``"blocks.6"``).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from narrows.errors import UserError


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name``; a UserError lists close names when there is none."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"top-level names: {', '.join(n for n in names if '.' not in n)}"
    raise UserError(f"the model has no layer '{name}'", f"give a dotted module name; {hint}")


def default_layer(model: nn.Module) -> str:
    """The default bottleneck layer's name: the output of the stride-8 stage (spec §5).

    Rules, first match wins:

    1. ViT-like (``patch_embed`` and ``blocks``): the middle block ``blocks.{len // 2}``; its
       output is a token map (N, D).
    2. ResNet-like (``layer2``; also the CIFAR ResNets, whose ``layer2`` has total stride 2):
       ``layer2``.
    3. timm stage models (``stages`` with at least two entries): ``stages.1``.
    4. VGG-like (``features`` holding Conv2d and MaxPool2d): conv4_1, the first Conv2d after the
       third max-pool, before its ReLU (``features.17`` for VGG-16).
    """
    children = dict(model.named_children())
    blocks = children.get("blocks")
    if "patch_embed" in children and blocks is not None and len(blocks) > 0:
        return f"blocks.{len(blocks) // 2}"
    if "layer2" in children:
        return "layer2"
    stages = children.get("stages")
    if stages is not None and len(stages) >= 2:
        return "stages.1"
    features = children.get("features")
    if isinstance(features, nn.Sequential):
        pools = 0
        for index, module in enumerate(features):
            if isinstance(module, nn.MaxPool2d):
                pools += 1
            elif isinstance(module, nn.Conv2d) and pools == 3:
                return f"features.{index}"
    raise UserError(
        f"no default bottleneck layer is known for {type(model).__name__}",
        "pass layer=<dotted module name>, the output of the stage with total stride 8",
    )


class _Interrupt(Exception):
    """Raised by a forward hook right after the layer, so the rest of the network is skipped."""


def run_to_layer(model: nn.Module, name: str, inputs: torch.Tensor) -> torch.Tensor:
    """The output of layer ``name`` for ``inputs``; the model is not run past that layer."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise UserError(f"layer '{name}' returns {type(output).__name__}, not a tensor",
                            "choose a layer whose output is a single tensor")
        captured.append(output)
        raise _Interrupt

    handle = get_layer(model, name).register_forward_hook(hook)
    try:
        model(inputs)
    except _Interrupt:
        pass
    finally:
        handle.remove()
    if not captured:
        raise UserError(f"layer '{name}' was not called during the forward pass",
                        "choose a layer that the model's forward actually uses")
    return captured[0]
