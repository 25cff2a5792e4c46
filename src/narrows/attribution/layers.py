"""Finding the layer a bottleneck is attached to, and replaying the model up to it.

Layers are addressed by their dotted name in ``model.named_modules()`` (``"layer2"``,
``"features.17"``, ``"stages.1"``, ``"blocks.6"``); :func:`get_layer` and :func:`run_to_layer`
are the core's (:mod:`narrows.models.layers`), imported here for attribution's callers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from narrows.errors import UserError
from narrows.models.layers import get_layer, run_to_layer

__all__ = ["PrefixReplay", "default_layer", "feature_maps", "get_layer", "run_to_layer"]


def default_layer(model: nn.Module) -> str:
    """The default bottleneck layer's name in ``model``: the output of the stride-8 stage (spec §5).

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
    probed = _probe_stride_layer(model, max_stride=8)
    if probed is not None:
        return probed
    raise UserError(
        f"no default bottleneck layer is known for {type(model).__name__}",
        "pass --layer NAME (layer= in Python), the dotted module name of the stage with total "
        "stride 8",
    )


def feature_maps(model: nn.Module, size: int = 64) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every named module that outputs a 4-D feature map, in the order
    the modules finish on one zero ``size×size`` image; ``[]`` when the model cannot run on it.
    The model's train/eval mode is restored."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return []
    try:
        parameter = next(model.parameters())
    except StopIteration:
        return []
    found: list[tuple[str, tuple[int, ...]]] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                found.append((name, tuple(output.shape)))
        return hook

    handles = [module.register_forward_hook(hook_for(name))
               for name, module in model.named_modules() if name]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, conv.in_channels, size, size, device=parameter.device,
                              dtype=parameter.dtype))
    except Exception:  # a model that cannot run at this size: nothing can be probed
        return []
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def _probe_stride_layer(model: nn.Module, max_stride: int, size: int = 64) -> str | None:
    """The last module (in forward order) whose output is a spatial map (more than 1×1) with
    a total stride of at most ``max_stride``: any CNN's stride-8 stage, or its deepest map
    of finer stride when it downsamples less. ``None`` when nothing qualifies."""
    maps = feature_maps(model, size)
    calls = {name: sum(1 for other, _ in maps if other == name) for name, _ in maps}
    chosen = None
    for name, shape in maps:
        height = shape[-2]
        # a module called more than once (a shared ReLU) cannot hold one bottleneck
        if calls[name] == 1 and height > 1 and size / height <= max_stride:
            chosen = name
    return chosen


class _Interrupt(Exception):
    """Raised by a forward hook right after the layer, so the rest of the network is skipped."""


class PrefixReplay:
    """Run the part of a model before layer ``name`` once, then replay it on every call.

    :meth:`record` runs ``model(inputs)`` up to and including the layer, without a graph, and
    keeps the outputs of the outermost module calls that finished before the layer began (in a
    ResNet: the stem and ``layer1``; in a ViT: ``patch_embed`` and the earlier blocks) and the
    layer's own output. While :meth:`active` is entered, those modules return their recorded
    outputs in call order instead of computing them, so ``model(inputs)`` costs only the
    glue code between modules plus the layers from ``name`` on. Forward hooks on the layer
    still fire (a bottleneck hook sees the recorded output).

    Valid when the model is deterministic for the given inputs (eval mode, frozen weights) and
    is called again with the same inputs; a module called before and after the layer replays
    only its early calls.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model, self.name = model, name
        self.layer = get_layer(model, name)
        self.outputs: dict[nn.Module, list[object]] = {}

    @torch.no_grad()
    def record(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the prefix once on ``inputs``; returns the layer's output."""
        stack: list[int] = []  # ids of the module calls in progress
        parents: dict[int, int | None] = {}
        ancestors: set[int] = set()
        finished: list[tuple[nn.Module, int, object]] = []
        counter = iter(range(1 << 62))
        captured: list[torch.Tensor] = []

        def pre(module: nn.Module, args: object) -> None:
            call = next(counter)
            parents[call] = stack[-1] if stack else None
            stack.append(call)
            if module is self.layer and not ancestors:
                ancestors.update(stack[:-1])

        def post(module: nn.Module, args: object, output: object) -> None:
            call = stack.pop()
            if module is self.layer and ancestors:
                if not isinstance(output, torch.Tensor):
                    raise UserError(f"layer '{self.name}' returns {type(output).__name__}, "
                                    "not a tensor", "choose a layer whose output is a tensor")
                captured.append(output)
                raise _Interrupt
            if not ancestors:
                finished.append((module, call, output))

        handles = []
        for module in self.model.modules():
            # prepended: record what forward() returned, before other hooks change it
            handles.append(module.register_forward_pre_hook(pre, prepend=True))
            handles.append(module.register_forward_hook(post, prepend=True))
        try:
            self.model(inputs)
        except _Interrupt:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            raise UserError(f"layer '{self.name}' was not called during the forward pass",
                            "choose a layer that the model's forward actually uses")
        self.outputs = {}
        for module, call, output in finished:
            if parents[call] in ancestors:  # outermost: its caller was still running
                self.outputs.setdefault(module, []).append(output)
        self.outputs.setdefault(self.layer, []).append(captured[0])
        return captured[0]

    @contextmanager
    def active(self) -> Iterator[PrefixReplay]:
        """Inside the block, each ``model(...)`` call replays the recorded prefix."""
        if not self.outputs:
            raise RuntimeError("PrefixReplay.record must run before PrefixReplay.active")
        position: dict[nn.Module, int] = {}
        patched: list[tuple[nn.Module, object]] = []

        def restart(module: nn.Module, args: object) -> None:
            position.clear()

        for module, outputs in self.outputs.items():
            original = module.forward

            def replay(*args: object, _m: nn.Module = module, _o: list[object] = outputs,
                       _f: object = original, **kwargs: object) -> object:
                index = position.get(_m, 0)
                position[_m] = index + 1
                return _o[index] if index < len(_o) else _f(*args, **kwargs)  # type: ignore[operator]

            patched.append((module, module.__dict__.get("forward")))
            module.forward = replay  # type: ignore[method-assign]
        handle = self.model.register_forward_pre_hook(restart)
        try:
            yield self
        finally:
            handle.remove()
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own  # type: ignore[method-assign]
