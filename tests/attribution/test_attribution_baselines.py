"""Baseline attribution methods (spec §7): shapes, closed forms, no leaked hooks, errors."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

pytest.importorskip("captum")
timm = pytest.importorskip("timm")

from narrows.attribution.baselines import (  # noqa: E402
    BASELINES,
    available_methods,
    default_cam_layer,
    make_method,
)
from narrows.errors import MissingExtraError, UserError  # noqa: E402

FAST = {"smoothgrad": {"n_samples": 4}, "integrated_gradients": {"n_steps": 8}, "ig_averaged": {"n_steps": 8}}
VIT_METHODS = ["saliency", "gradient", "input_x_gradient", "integrated_gradients", "ig_averaged",
               "smoothgrad", "gradcam", "occlusion_8", "occlusion_14"]


class TinyVgg(nn.Module):
    """A VGG-like net with only LRP-supported leaves (flatten is functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _zero_biases(model: nn.Module) -> nn.Module:
    """Biases absorb LRP relevance; without them a VGG-like net conserves it exactly."""
    for module in model.modules():
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    return model.eval()


class TinySkip(TinyVgg):
    """Same leaves, plus a functional skip addition that LRP cannot see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features[1](self.features[0](x))
        a = self.features[5](self.features[4](self.features[3](self.features[2](a + a))))
        return self.classifier(torch.flatten(a, 1))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10, pretrained=False).eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10,
                             pretrained=False).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _hooks_empty(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
               and not m._backward_pre_hooks for m in model.modules())


def _run_and_check(model: nn.Module, name: str, images: torch.Tensor, target: int | torch.Tensor) -> None:
    with torch.no_grad():
        before = model(images)
    heat = make_method(name, model, **FAST.get(name, {})).attribute(images, target=target)
    assert heat.shape == (2, 32, 32) and heat.dtype == torch.float32
    assert torch.isfinite(heat).all()
    assert _hooks_empty(model), f"{name} left hooks behind"
    with torch.no_grad():
        assert torch.equal(model(images), before), f"{name} changed the model"


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "lrp"])
def test_every_method_on_resnet(resnet: nn.Module, images: torch.Tensor, name: str) -> None:
    _run_and_check(resnet, name, images, target=torch.tensor([3, 7]))


@pytest.mark.parametrize("name", VIT_METHODS)
def test_vit_methods(vit: nn.Module, images: torch.Tensor, name: str) -> None:
    _run_and_check(vit, name, images, target=2)


def test_vit_gradcam_uses_token_grid_and_is_not_zero(vit: nn.Module, images: torch.Tensor) -> None:
    assert default_cam_layer(vit) == f"blocks.{len(vit.blocks) - 2}"
    heat = make_method("gradcam", vit).attribute(images, target=2)
    assert heat.abs().sum() > 0


def test_resnet_default_cam_layer_and_predicted_target(resnet: nn.Module, images: torch.Tensor) -> None:
    assert default_cam_layer(resnet) == "layer4"
    with torch.no_grad():
        predicted = resnet(images).argmax(1)
    method = make_method("gradcam", resnet)
    assert torch.equal(method.attribute(images), method.attribute(images, target=predicted))


def test_guided_backprop_refused_without_relu(vit: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(UserError, match="ReLU"):
        make_method("guided_backprop", vit).attribute(images, target=0)


def test_linear_model_closed_forms() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(3 * 8 * 8, 4)
    model = nn.Sequential(nn.Flatten(), linear).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = (linear.weight[1].reshape(3, 8, 8) * x).sum(1).detach()
    ixg = make_method("input_x_gradient", model).attribute(x, target=1)
    ig = make_method("ig", model, n_steps=5).attribute(x, target=1)
    torch.testing.assert_close(ixg, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ig, expected, rtol=1e-5, atol=1e-6)
    averaged = make_method("ig_averaged", model, n_steps=5).attribute(x, target=1)
    torch.testing.assert_close(averaged, linear.weight[1].reshape(3, 8, 8).mean(0).expand(2, 8, 8).detach())


def test_occlusion_linear_model_is_tile_sum() -> None:
    """With a zero baseline, a tile's logit drop on a linear model is Σ_tile w·x."""
    torch.manual_seed(0)
    linear = nn.Linear(3 * 16 * 16, 2)
    model = nn.Sequential(nn.Flatten(), linear).eval()
    x = torch.randn(1, 3, 16, 16)
    contrib = (linear.weight[0].reshape(3, 16, 16) * x[0]).sum(0).detach()
    tiles = contrib.reshape(2, 8, 2, 8).sum((1, 3))
    expected = tiles.repeat_interleave(8, 0).repeat_interleave(8, 1)
    heat = make_method("occlusion_8", model, baseline="zero").attribute(x, target=0)
    torch.testing.assert_close(heat[0], expected, rtol=1e-4, atol=1e-5)


def test_random_is_seeded(images: torch.Tensor) -> None:
    model = nn.Identity()
    a = make_method("random", model, seed=3).attribute(images)
    b = make_method("random", model, seed=3).attribute(images)
    c = make_method("random", model, seed=4).attribute(images)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 32, 32) and a.unique().numel() == 32 * 32


def test_smoothgrad_seed_is_reproducible_and_leaves_global_rng(resnet: nn.Module, images: torch.Tensor) -> None:
    state = torch.random.get_rng_state()
    a = make_method("smoothgrad", resnet, n_samples=3, seed=5).attribute(images, target=1)
    b = make_method("smoothgrad", resnet, n_samples=3, seed=5).attribute(images, target=1)
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_lrp_on_vgg_like_conserves_and_cleans_up() -> None:
    torch.manual_seed(0)
    model = _zero_biases(TinyVgg())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    heat = make_method("lrp", model).attribute(x, target=1)
    assert heat.shape == (2, 16, 16) and torch.isfinite(heat).all()
    assert _hooks_empty(model)
    assert not any(k in m.__dict__ for m in model.modules() for k in ("rule", "activations"))
    with torch.no_grad():
        assert torch.equal(model(x), before)
        torch.testing.assert_close(heat.sum((1, 2)), before[:, 1], rtol=1e-4, atol=1e-6)


def test_lrp_refuses_unsupported_layers_and_skip_connections(resnet: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(UserError, match="no rule for layers of type"):
        make_method("lrp", resnet).attribute(images, target=0)
    with pytest.raises(UserError, match="does not conserve"):
        make_method("lrp", _zero_biases(TinySkip())).attribute(torch.randn(2, 3, 16, 16), target=1)
    assert _hooks_empty(resnet)


def test_unknown_method_and_option(resnet: nn.Module) -> None:
    with pytest.raises(UserError, match="available: .*saliency"):
        make_method("nope", resnet)
    with pytest.raises(UserError, match="n_steps"):
        make_method("ig", resnet, steps=3)
    assert "ig" not in available_methods() and "integrated_gradients" in available_methods()


def test_missing_captum_names_the_extra(monkeypatch: pytest.MonkeyPatch, resnet: nn.Module) -> None:
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(MissingExtraError, match=r"narrows\[baselines\]"):
        make_method("saliency", resnet)
    assert make_method("random", resnet) is not None  # random needs no captum


def test_gradcam_default_layer_of_cifar_resnets() -> None:
    from narrows.attribution.baselines import default_cam_layer
    from narrows.models import create

    assert default_cam_layer(create("resnet20_cifar", num_classes=10)) == "layer3"
