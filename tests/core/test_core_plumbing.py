"""The core's model plumbing: layers by name, hooks removed on exit, pooled pre-logit features."""

from __future__ import annotations

import pytest
import timm
import torch
from tiny import seeded_model
from torch import nn

from narrows.errors import UserError
from narrows.models import (
    capture,
    get_layer,
    hooked,
    pooled_features,
    run_to_layer,
)


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return seeded_model("resnet20_cifar", num_classes=3).eval()


def test_get_layer_names_close_layers(resnet: nn.Module) -> None:
    assert get_layer(resnet, "layer2.1") is resnet.layer2[1]
    with pytest.raises(UserError, match="no layer 'layr2'.*close names: layer2"):
        get_layer(resnet, "layr2")
    with pytest.raises(UserError, match="no layer ''"):
        get_layer(resnet, "")


@torch.no_grad()
def test_run_to_layer_equals_the_full_forwards_intermediate(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    with capture(resnet, ["layer2", "layer3.1"]) as store:
        resnet(x)
    for name in ("layer2", "layer3.1"):
        assert torch.equal(run_to_layer(resnet, name, x), store[name])
    assert _hooks(resnet) == 0
    calls: list[str] = []
    with hooked(resnet.layer3, lambda *_: calls.append("layer3")):
        run_to_layer(resnet, "layer2", x)
    assert calls == []  # the forward stopped at layer2


def test_hooks_are_removed_on_exit_even_after_errors(resnet: nn.Module) -> None:
    x = torch.randn(1, 3, 8, 8)

    def fail(*_: object) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooked(resnet.layer1, fail):
        resnet(x)
    with pytest.raises(RuntimeError, match="inside"), capture(resnet, "layer1"):
        raise RuntimeError("inside")
    with pytest.raises(UserError, match="no layer 'nosuch'"), capture(resnet, ["layer1", "nosuch"]):
        pass
    with pytest.raises(RuntimeError, match="boom"), hooked(resnet.layer2, fail, pre=True):
        run_to_layer(resnet, "layer3", x)
    assert _hooks(resnet) == 0


def test_non_tensor_outputs_and_layers_never_called() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair, self.unused = Pair(), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pair(x)[0]

    net, x = Net(), torch.zeros(1, 2)
    with pytest.raises(UserError, match="returns tuple, not a tensor"):
        run_to_layer(net, "pair", x)
    with pytest.raises(UserError, match="single tensors"), capture(net, "pair", fix="single tensors"):
        net(x)
    with pytest.raises(UserError, match="not called"):
        run_to_layer(net, "unused", x)
    assert _hooks(net) == 0


def _classifier_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    with hooked(model.get_classifier(), lambda _m, args: seen.append(args[0]), pre=True):
        model(x)
    return seen[0]


@pytest.mark.parametrize("name", ["resnet20_cifar", "test_resnet", "test_vit"])
@torch.no_grad()
def test_pooled_features_are_the_classifiers_input(name: str) -> None:
    torch.manual_seed(0)
    size = 16 if name == "resnet20_cifar" else 32
    options = {"img_size": size} if name == "test_vit" else {}
    model = timm.create_model(name, num_classes=5, **options).eval()
    x = torch.randn(2, 3, size, size)
    h = pooled_features(model)(x)
    assert h.ndim == 2 and h.shape[0] == 2
    assert torch.equal(h, _classifier_input(model, x))
    assert torch.allclose(h, model.forward_head(model.forward_features(x), pre_logits=True))
    assert torch.allclose(model.get_classifier()(h), model(x), atol=1e-5)
    assert _hooks(model) == 0
    model.reset_classifier(0)  # no linear classifier: timm's pre-logits
    assert torch.allclose(pooled_features(model)(x), h, atol=1e-6)
