"""Baseline attribution methods compared against IBA (spec §7), behind one interface.

``make_method(name, model, layer=None, normalizer=None, **options).attribute(x, target)``
returns one float heatmap per image, shape (N, H, W). Inputs are (N, C, H, W) images in [0, 1]
with ``normalizer`` (see :mod:`narrows.attribution.inputs`), or model inputs (normalised)
without it. ``target`` is a class index (int), one index per image (tensor of shape (N,)), or
``None`` for each image's predicted class (Grad-CAM in the paper code explains the predicted
class, every other method the label: spec §14.4; pick one per run and record it).

Everything but ``random`` wraps Captum, an optional dependency (``narrows[baselines]``),
imported only when a method is built. Methods never change the model permanently: Captum's
hooks are removed when each call returns. The model is not switched to eval mode; pass a
model in the mode you want explained.

Channel reductions follow the paper code (spec §7): ``saliency`` and ``guided_backprop`` take
the max over channels of the absolute value; ``gradient``, ``smoothgrad`` and
``ig_averaged`` the signed mean; ``input_x_gradient``, ``integrated_gradients`` and ``lrp`` the
sum (so the map sums to the attributed logit change); Grad-CAM is a layer map, ReLU'd and
upsampled bilinearly; occlusion maps are the target-logit drop of each tile.

Layer methods (``gradcam``, ``guided_gradcam``) default to the last convolutional stage:
``layer4`` (ResNets), the last of timm ``stages``, or ``features`` (VGG-like). For ViT-like
models (``patch_embed`` and ``blocks``) the patch tokens of a block output, (N, 1 + h·w, D)
with the class token first, are viewed as a (N, D, h, w) grid (prefix tokens dropped) through
a temporary forward hook, and Grad-CAM runs on that grid. The default block is the *second to
last*: with class-token pooling (timm ``global_pool="token"``) the patch tokens leaving the last
block never reach the head, so their gradient, and the Grad-CAM map, would be zero. With any
other pooling the last block is used. Only ``blocks.<i>`` layers get the grid view; other
token-shaped ViT layers are not supported by the layer methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from narrows.attribution.layers import _probe_stride_layer, feature_maps, get_layer
from narrows.errors import UserError, optional_import

Target = int | torch.Tensor | None

__all__ = [
    "BASELINES",
    "BaselineMethod",
    "available_methods",
    "default_cam_layer",
    "make_method",
    "method_units",
]


def _captum(feature: str) -> Any:
    """The ``captum.attr`` module, or MissingExtraError naming ``narrows[baselines]``."""
    return optional_import("captum.attr", extra="baselines", feature=feature)


def _check_inputs(inputs: torch.Tensor) -> None:
    """Raise a UserError unless ``inputs`` is a (N, C, H, W) floating tensor."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise UserError(f"attribution inputs must be a float (N, C, H, W) tensor, got {shape}",
                        "pass a batch of normalised images")


def _resolve_target(model: nn.Module, inputs: torch.Tensor, target: Target) -> int | torch.Tensor:
    """``target`` as Captum takes it; ``None`` becomes each image's predicted class."""
    if target is None:
        with torch.no_grad():
            return model(inputs).argmax(dim=1)
    if isinstance(target, torch.Tensor):
        target = target.to(inputs.device).long().reshape(-1)
        if target.numel() not in (1, inputs.shape[0]):
            raise UserError(f"target has {target.numel()} entries for {inputs.shape[0]} images",
                            "give one class index, or one per image")
        return target if target.numel() > 1 else int(target.item())
    return int(target)


def _is_vit(model: nn.Module) -> bool:
    """Whether the model looks like a timm ViT: ``patch_embed`` plus a ``blocks`` sequence."""
    blocks = getattr(model, "blocks", None)
    return hasattr(model, "patch_embed") and isinstance(blocks, nn.Sequential | nn.ModuleList)


def default_cam_layer(model: nn.Module) -> str:
    """Dotted name of the default Grad-CAM layer (module docstring gives the rules)."""
    children = dict(model.named_children())
    if _is_vit(model):
        blocks = children["blocks"]
        token_pool = getattr(model, "global_pool", "token") == "token"
        index = len(blocks) - 2 if token_pool and len(blocks) > 1 else len(blocks) - 1
        return f"blocks.{index}"
    if "layer4" in children:
        return "layer4"
    if "layer3" in children and "layer1" in children:  # three-stage CIFAR ResNets
        return "layer3"
    stages = children.get("stages")
    if isinstance(stages, nn.Sequential | nn.ModuleList) and len(stages) > 0:
        return f"stages.{len(stages) - 1}"
    if "features" in children and any(name == "features" for name, _ in feature_maps(model)):
        return "features"  # only when it ends in a spatial map (not flattened features)
    probed = _probe_stride_layer(model, max_stride=10**9)
    if probed is not None:  # any CNN: its last spatial feature map
        return probed
    raise UserError(f"no default Grad-CAM layer is known for {type(model).__name__}",
                    "pass --layer NAME (layer= in Python), the dotted module name of the last "
                    "convolutional stage")


class _TokenGrid(nn.Module):
    """Views patch tokens (N, h·w, D) as a feature grid (N, D, h, w); an identity otherwise."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, _, d = tokens.shape
        return tokens.transpose(1, 2).reshape(n, d, *self.grid)


def _vit_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid (h, w) of a timm ViT."""
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None:
        raise UserError(f"cannot find the patch grid of {type(model).__name__}",
                        "the model's patch_embed needs a grid_size attribute (timm ViTs have one)")
    return int(grid[0]), int(grid[1])


@contextlib.contextmanager
def _token_grid_view(model: nn.Module, layer: nn.Module) -> Iterator[nn.Module]:
    """Route ``layer``'s token output through a grid module Captum can hook; yields it.

    The forward hook splits off the prefix (class) tokens, passes the patch tokens through
    the grid module and flattens them back, so the model's output is unchanged while
    gradients reach the grid. The hook is removed on exit, even after an error.
    """
    grid = _TokenGrid(_vit_grid(model))
    cells = grid.grid[0] * grid.grid[1]

    def hook(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        prefix = output.shape[1] - cells
        patches = grid(output[:, prefix:]).flatten(2).transpose(1, 2)
        return torch.cat([output[:, :prefix], patches], dim=1)

    handle = layer.register_forward_hook(hook)
    try:
        yield grid
    finally:
        handle.remove()


class BaselineMethod:
    """One attribution method bound to a model (and, for layer methods, a layer).

    ``units`` names what a map's values measure (for colour bars) and ``signed`` whether they
    can be negative (drawn on a diverging colour map centred at 0); :meth:`describe` is the
    method's metadata: name, units, sign and every parameter used.
    """

    name: str = ""
    needs_captum: bool = True
    defaults: dict[str, Any] = {}
    units: str = "attribution (a.u.)"
    signed: bool = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, *,
                 normalizer: Any = None, **options: Any) -> None:
        from narrows.attribution.inputs import as_normalizer

        self.model = model
        self.layer = layer
        self.normalizer = as_normalizer(normalizer)
        self.options = self._check_options(options)
        if self.needs_captum:
            self.captum = _captum(f"the '{self.name}' attribution baseline")

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options merged over ``defaults``; unknown keys raise a UserError."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise UserError(f"unknown option(s) {', '.join(unknown)} for method '{self.name}'",
                            f"options accepted: {allowed}")
        return {**self.defaults, **options}

    def describe(self) -> dict[str, Any]:
        """Metadata of a map of this method (JSON-ready): ``method``, ``units``, ``signed`` and
        ``parameters`` (every option used, and the layer of layer methods)."""
        return {"method": self.name, "units": self.units, "signed": self.signed,
                "parameters": {k: _jsonable(v) for k, v in self.parameters().items()}}

    def parameters(self) -> dict[str, Any]:
        """The options this method runs with (defaults filled in)."""
        return dict(self.options)

    def attribute(self, inputs: torch.Tensor, target: Target = None) -> torch.Tensor:
        """Heatmaps (N, H, W), float, detached, of ``inputs`` ((N, C, H, W)) towards
        ``target`` (a class, one per image, or None: the predicted class)."""
        from narrows.attribution.inputs import model_inputs

        _check_inputs(inputs)
        inputs = model_inputs(inputs, self.normalizer)
        resolved = _resolve_target(self.model, inputs, target)
        maps = self._attribute(inputs.detach().clone().requires_grad_(True), resolved)
        return maps.detach().float()

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RandomMethod(BaselineMethod):
    """Random ranking: each map is a seeded permutation of linspace(−1, 1, H·W) (no ties)."""

    name = "random"
    needs_captum = False
    defaults = {"seed": 0}
    units = "random rank (a.u.)"

    def attribute(self, inputs: torch.Tensor, target: Target = None) -> torch.Tensor:
        _check_inputs(inputs)  # no forward pass: the target is irrelevant
        return self._attribute(inputs, 0)

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        n, _, h, w = inputs.shape
        generator = torch.Generator().manual_seed(int(self.options["seed"]))
        values = torch.linspace(-1.0, 1.0, h * w)
        maps = torch.stack([values[torch.randperm(h * w, generator=generator)] for _ in range(n)])
        return maps.reshape(n, h, w).to(inputs.device)


class SaliencyMethod(BaselineMethod):
    """Simonyan saliency: max over channels of |∂logit/∂x|."""

    name = "saliency"
    units = "|∂ logit / ∂ input| (max over channels)"
    signed = False

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        grads = self.captum.Saliency(self.model).attribute(inputs, target=target, abs=True)
        return grads.amax(dim=1)


class GradientMethod(BaselineMethod):
    """Upstream "Gradient" (and its "Saliency" alias): signed channel mean of ∂logit/∂x.

    The paper code also clips to the [0.5, 99.5] percentiles and divides by the sum; that
    post-processing is not applied here.
    """

    name = "gradient"
    units = "∂ logit / ∂ input (mean over channels)"

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        grads = self.captum.Saliency(self.model).attribute(inputs, target=target, abs=False)
        return grads.mean(dim=1)


class InputXGradientMethod(BaselineMethod):
    """Gradient × input, summed over channels."""

    name = "input_x_gradient"
    units = "logit contribution / pixel"

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        attr = self.captum.InputXGradient(self.model).attribute(inputs, target=target)
        return attr.sum(dim=1)


def _baseline_map(inputs: torch.Tensor, kind: str) -> torch.Tensor:
    """Reference image: ``"zero"`` (the dataset mean in normalised space) or ``"mean"`` (each
    image's per-channel mean colour)."""
    if kind == "zero":
        return torch.zeros_like(inputs)
    if kind == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs).contiguous()
    raise UserError(f"unknown baseline '{kind}'", "use baseline='zero' or baseline='mean'")


class IntegratedGradientsMethod(BaselineMethod):
    """Standard Integrated Gradients (Sundararajan), summed over channels; baseline 0."""

    name = "integrated_gradients"
    units = "logit contribution / pixel"
    defaults = {"n_steps": 50, "baseline": "zero", "method": "gausslegendre", "internal_batch_size": None}

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        ig = self.captum.IntegratedGradients(self.model, multiply_by_inputs=True)
        attr = ig.attribute(inputs, baselines=_baseline_map(inputs, self.options["baseline"]),
                            target=target, n_steps=int(self.options["n_steps"]),
                            method=self.options["method"],
                            internal_batch_size=self.options["internal_batch_size"])
        return attr.sum(dim=1)


class AveragedGradientMethod(BaselineMethod):
    """Upstream "Int. Grad. (of Saliency)": the mean raw gradient on the path, not × (x − x').

    Baseline = each image's per-channel mean; points x' + (i/n)(x − x'), i = 1…n (right
    Riemann sum); signed mean over channels (spec §7).
    """

    name = "ig_averaged"
    units = "mean ∂ logit / ∂ input on the path"
    defaults = {"n_steps": 50, "baseline": "mean", "internal_batch_size": None}

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        ig = self.captum.IntegratedGradients(self.model, multiply_by_inputs=False)
        attr = ig.attribute(inputs, baselines=_baseline_map(inputs, self.options["baseline"]),
                            target=target, n_steps=int(self.options["n_steps"]),
                            method="riemann_right",
                            internal_batch_size=self.options["internal_batch_size"])
        return attr.mean(dim=1)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Fork the global RNG (CPU, and ``device`` if CUDA) and seed it; a no-op for ``None``."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


class SmoothGradMethod(BaselineMethod):
    """SmoothGrad of the signed gradient, signed channel mean (spec §7).

    Noise std per image = ``stdev_spread`` × (max(x) − min(x)) of that image, unless an
    absolute ``stdev`` is given. ``seed`` makes the noise reproducible without touching the
    global RNG state (``None``: use the global RNG).
    """

    name = "smoothgrad"
    units = "∂ logit / ∂ input (noise average)"
    defaults = {"n_samples": 50, "stdev_spread": 0.15, "stdev": None, "seed": 0, "batch_size": None}

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        tunnel = self.captum.NoiseTunnel(self.captum.Saliency(self.model))
        maps = []
        with _seeded(self.options["seed"], inputs.device):
            for index in range(inputs.shape[0]):
                image = inputs[index : index + 1]
                image_target = target if isinstance(target, int) else target[index : index + 1]
                grads = tunnel.attribute(image, nt_type="smoothgrad",
                                         nt_samples=int(self.options["n_samples"]),
                                         nt_samples_batch_size=self.options["batch_size"],
                                         stdevs=self._stdev(image), target=image_target, abs=False)
                maps.append(grads.mean(dim=1))
        return torch.cat(maps)

    def _stdev(self, image: torch.Tensor) -> float:
        """The noise std for one image."""
        if self.options["stdev"] is not None:
            return float(self.options["stdev"])
        return float(self.options["stdev_spread"]) * float(image.detach().max() - image.detach().min())


def _relu_check(model: nn.Module, name: str) -> None:
    """Raise a UserError when the model has no ``nn.ReLU`` module for Captum to modify."""
    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise UserError(f"'{name}' changes the backward pass of nn.ReLU modules and the model has none",
                        "use it on ReLU networks (functional relu, GELU and ViTs are not supported)")


class _GuidedMethod(BaselineMethod):
    """A method that changes the backward pass of the model's ``nn.ReLU`` modules (Captum's
    temporary hooks); its map is the max over channels of |·| of :meth:`_guided`."""

    signed = False

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        _relu_check(self.model, self.name)
        return self._guided(inputs, target).abs().amax(dim=1)

    def _guided(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GuidedBackpropMethod(_GuidedMethod):
    """Guided Backprop (via Captum's temporary ReLU hooks), max over channels of |·|."""

    name = "guided_backprop"
    units = "|guided gradient| (a.u.)"

    def _guided(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        return self.captum.GuidedBackprop(self.model).attribute(inputs, target=target)


class _LayerMethod(BaselineMethod):
    """A method that needs a layer: ``layer`` (name or module) or the default CAM layer."""

    def _layer(self) -> nn.Module:
        if isinstance(self.layer, nn.Module):
            return self.layer
        return get_layer(self.model, self.layer_name())

    def layer_name(self) -> str:
        """The dotted name of the layer used (the default CAM layer when none was given)."""
        if isinstance(self.layer, nn.Module):
            return next((n for n, m in self.model.named_modules() if m is self.layer),
                        type(self.layer).__name__)
        return self.layer or default_cam_layer(self.model)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "layer": self.layer_name()}

    @contextlib.contextmanager
    def _captum_layer(self) -> Iterator[nn.Module]:
        """The module Captum should hook: the layer, or a token-grid view of it for ViTs."""
        layer = self._layer()
        if _is_vit(self.model) and any(layer is block for block in self.model.blocks):
            with _token_grid_view(self.model, layer) as grid:
                yield grid
        else:
            yield layer


class GradCamMethod(_LayerMethod):
    """Grad-CAM: ReLU'd layer map, bilinearly upsampled to (H, W); not max-normalised."""

    name = "gradcam"
    units = "Grad-CAM (a.u.)"
    signed = False

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        with self._captum_layer() as layer:
            cam = self.captum.LayerGradCam(self.model, layer).attribute(
                inputs, target=target, relu_attributions=True)
        if cam.dim() != 4:
            raise UserError(f"Grad-CAM layer '{self.parameters().get('layer', '?')}' outputs "
                            f"{tuple(cam.shape[1:])}, not a (channels, height, width) map",
                            "pass --layer NAME of a convolutional stage")
        cam = F.interpolate(cam.sum(dim=1, keepdim=True), size=inputs.shape[2:], mode="bilinear",
                            align_corners=False)
        return cam[:, 0]


class GuidedGradCamMethod(_GuidedMethod, _LayerMethod):
    """Guided Grad-CAM (Captum: per-channel product, bilinear upsampling), max over channels of |·|."""

    name = "guided_gradcam"
    units = "|guided Grad-CAM| (a.u.)"

    def _guided(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        if _is_vit(self.model):
            raise UserError("'guided_gradcam' is not supported on ViT-like models",
                            "use 'gradcam' (token grid) instead")
        method = self.captum.GuidedGradCam(self.model, self._layer())
        return method.attribute(inputs, target=target, interpolate_mode="bilinear")


class OcclusionMethod(BaselineMethod):
    """Occlusion with k×k patches and stride k; the map is the target-logit drop per tile.

    ``baseline="mean"`` fills a patch with the image's per-channel mean (degradation and bbox
    protocols); ``"zero"`` with 0 (sensitivity-n). When H or W is not a multiple of k the
    last partial row/column is never occluded and gets 0.
    """

    window: int = 8
    defaults = {"baseline": "mean", "perturbations_per_eval": 16}
    units = "target-logit drop"

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "window": self.window, "stride": self.window}

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        channels = inputs.shape[1]
        k = self.window
        attr = self.captum.Occlusion(self.model).attribute(
            inputs, sliding_window_shapes=(channels, k, k), strides=(channels, k, k),
            baselines=_baseline_map(inputs, self.options["baseline"]), target=target,
            perturbations_per_eval=int(self.options["perturbations_per_eval"]))
        return torch.nan_to_num(attr[:, 0], nan=0.0)


class Occlusion8Method(OcclusionMethod):
    """Occlusion-8x8."""

    name = "occlusion_8"
    window = 8


class Occlusion14Method(OcclusionMethod):
    """Occlusion-14x14."""

    name = "occlusion_14"
    window = 14


def _leaf_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Modules without children, in the order Captum's LRP collects them."""
    for child in model.children():
        if len(list(child.children())) == 0:
            yield child
        else:
            yield from _leaf_modules(child)


_PASSTHROUGH = (nn.Identity,)


class LRPMethod(BaselineMethod):
    """Captum LRP (epsilon rule defaults), summed over channels.

    Refuses models with a leaf module Captum has no rule for (naming its type; ``nn.Identity``
    gets Captum's identity rule), and maps whose relevance is not conserved
    (|Σ relevance − logit| > ``max_delta`` × |logit|), e.g. ResNets, whose skip additions are
    not modules (spec §14.7). Bias terms also absorb relevance under the epsilon rule, so
    bias-heavy (e.g. randomly initialised) models can be refused too; ``max_delta=None``
    turns the check off.
    """

    name = "lrp"
    defaults = {"max_delta": 0.1}
    units = "relevance (logit units) / pixel"

    def _check_conservation(self, inputs: torch.Tensor, target: int | torch.Tensor,
                            delta: torch.Tensor) -> None:
        """Raise a UserError when |Σ relevance − logit| > ``max_delta`` × |logit| for any image."""
        if self.options["max_delta"] is None:
            return
        with torch.no_grad():
            logits = self.model(inputs)
        index = torch.as_tensor(target, device=inputs.device).expand(inputs.shape[0])
        logit = logits.gather(1, index[:, None])[:, 0]
        relative = delta.abs() / (logit.abs() + 1e-6)
        if bool((relative > float(self.options["max_delta"])).any()):
            raise UserError("Captum LRP does not conserve relevance on this model "
                            f"(worst |sum − logit| / |logit| = {float(relative.max()):.3g})",
                            "skip connections, functional ops or large biases absorb relevance; pick "
                            "another method, or pass max_delta=None to accept the map anyway")

    def _check_layers(self) -> list[nn.Module]:
        """Raise for unsupported leaves; return the pass-through leaves needing an identity rule."""
        from captum.attr._core import lrp as captum_lrp  # guarded by _captum() in __init__

        supported = set(captum_lrp.SUPPORTED_LAYERS_WITH_RULES) | set(captum_lrp.SUPPORTED_NON_LINEAR_LAYERS)
        passthrough = []
        for module in _leaf_modules(self.model):
            if type(module) in _PASSTHROUGH and not hasattr(module, "rule"):
                passthrough.append(module)
            elif type(module) not in supported and not hasattr(module, "rule"):
                raise UserError(f"Captum LRP has no rule for layers of type {type(module).__name__}",
                                "LRP supports Conv2d, Linear, BatchNorm2d, pooling, ReLU, Dropout, Tanh "
                                "and Identity leaves only (e.g. VGG); pick another method")
        return passthrough

    def _attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        passthrough = self._check_layers()
        leaves = list(_leaf_modules(self.model))
        user_rules = {module: module.__dict__["rule"] for module in leaves if "rule" in module.__dict__}
        try:
            for module in passthrough:
                module.rule = self.captum.IdentityRule()
            attr, delta = self.captum.LRP(self.model).attribute(inputs, target=target,
                                                                return_convergence_delta=True)
            delta = delta.detach()
        finally:  # Captum deletes every rule, and leaves ``activations`` behind
            for module in leaves:
                for attribute in ("activations", "rule"):
                    if attribute in module.__dict__:
                        delattr(module, attribute)
            for module, rule in user_rules.items():
                module.rule = rule
        self._check_conservation(inputs, target, delta)
        return attr.sum(dim=1)


BASELINES: dict[str, type[BaselineMethod]] = {
    cls.name: cls
    for cls in (RandomMethod, SaliencyMethod, GradientMethod, InputXGradientMethod,
                IntegratedGradientsMethod, AveragedGradientMethod, SmoothGradMethod,
                GuidedBackpropMethod, GradCamMethod, GuidedGradCamMethod, Occlusion8Method,
                Occlusion14Method, LRPMethod)
}
"""Method name → class. ``ALIASES`` maps further accepted spellings onto these names."""

ALIASES: dict[str, str] = {"ig": "integrated_gradients", "grad_cam": "gradcam"}


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can hold it, else its ``str``."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def available_methods() -> list[str]:
    """Sorted method names accepted by :func:`make_method` (aliases excluded)."""
    return sorted(BASELINES)


def method_units(name: str) -> tuple[str, bool]:
    """``(units, signed)`` of the maps of method ``name`` (``iba``/``readout``: bits, unsigned)."""
    if name in ("iba", "readout"):
        return "bits per input pixel", False
    cls = BASELINES.get(ALIASES.get(name, name))
    return (cls.units, cls.signed) if cls is not None else ("attribution (a.u.)", True)


def uses_layer(name: str) -> bool:
    """Whether baseline ``name`` (or its alias) is a layer method (Grad-CAM, Guided Grad-CAM)."""
    cls = BASELINES.get(ALIASES.get(name, name))
    return cls is not None and issubclass(cls, _LayerMethod)


def make_method(name: str, model: nn.Module, layer: str | nn.Module | None = None,
                **options: Any) -> BaselineMethod:
    """Build baseline ``name`` for ``model``; unknown names raise a UserError listing the rest.

    ``layer`` is used only by layer methods (Grad-CAM, Guided Grad-CAM); ``options`` are the
    method's (see its ``defaults``) and ``normalizer`` (a Normalizer or callable) makes
    ``attribute`` take [0, 1] images. Returns the :class:`BaselineMethod`; raises
    MissingExtraError when the method needs Captum and it is not installed.
    """
    key = ALIASES.get(name, name)
    cls = BASELINES.get(key)
    if cls is None:
        raise UserError(f"unknown attribution method '{name}'",
                        f"available: {', '.join(available_methods())} (aliases: {', '.join(sorted(ALIASES))})")
    return cls(model, layer, **options)

