"""PrefixReplay: the part before the bottleneck layer runs once per image, not once per step."""

from __future__ import annotations

import contextlib

import timm
import torch
from tiny import quietly, random_batches
from torch import nn

from narrows.attribution import IBA, estimate_statistics, per_sample
from narrows.attribution.layers import PrefixReplay, get_layer
from narrows.models.cifar_resnet import resnet20_cifar

torch.set_num_threads(2)


class SharedReLU(nn.Module):
    """One ReLU module called before and after the layer, plus glue code between modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x)) * 0.5 + 0.1
        x = self.relu(self.mid(x))
        x = self.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             num_classes=5, depth=4)


CASES = [
    (lambda: resnet20_cifar(num_classes=10), "layer2", "conv1", "layer3.0.conv1", 32),
    (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), "layer2.1",
     "conv1", "fc", 64),
    (_vit, "blocks.2", "patch_embed.proj", "head", 32),
    (SharedReLU, "mid", "conv1", "conv2", 16),
]


def _perturb(module: nn.Module) -> None:
    module.weight.add_(torch.randn_like(module.weight))


def test_replay_matches_the_full_model_and_skips_the_prefix() -> None:
    for build, layer, before, after, size in CASES:
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(1, 3, size, size)

        def double(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
            return output * 2  # a stand-in for the bottleneck hook

        handle = get_layer(model, layer).register_forward_hook(double)
        with torch.no_grad():
            expected = model(x)
            replay = PrefixReplay(model, layer)
            r = replay.record(x)
            with replay.active():
                assert torch.allclose(model(x), expected, atol=1e-5), layer
                assert torch.allclose(model(x), expected, atol=1e-5), layer  # every call
                # the prefix is not recomputed: changing its weights changes nothing ...
                _perturb(get_layer(model, before))
                assert torch.allclose(model(x), expected, atol=1e-5), layer
                # ... while the part after the layer does run
                _perturb(get_layer(model, after))
                assert not torch.allclose(model(x), expected, atol=1e-3), layer
        handle.remove()
        assert r.shape[0] == 1
        # everything is restored on exit: the model computes afresh
        assert "forward" not in get_layer(model, before).__dict__
        with torch.no_grad():
            before_change = model(x)
            _perturb(get_layer(model, before))
            assert not torch.allclose(model(x), before_change, atol=1e-3), layer


class _NoReplay:
    """Stands in for PrefixReplay: the whole model runs at every step."""

    def __init__(self, model: nn.Module, name: str) -> None:
        pass

    def record(self, x: torch.Tensor) -> None:
        return None

    def active(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def test_iba_with_replay_equals_iba_running_the_whole_model(monkeypatch) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    stats = quietly(estimate_statistics, model, "layer2", random_batches(4, 8, 64), n_samples=32)
    image = torch.randn(3, 64, 64)
    torch.manual_seed(1)
    fast = IBA(model, "layer2", stats, steps=4, batch_size=3, record_steps=True).attribute(image, 2)
    monkeypatch.setattr(per_sample, "PrefixReplay", _NoReplay)
    torch.manual_seed(1)
    full = IBA(model, "layer2", stats, steps=4, batch_size=3, record_steps=True).attribute(image, 2)
    assert fast.meta["prefix_images_per_image"] == 1
    assert torch.allclose(torch.from_numpy(fast.capacity), torch.from_numpy(full.capacity),
                          rtol=1e-4, atol=1e-6)
    assert abs(fast.step_heatmaps - full.step_heatmaps).max() < 1e-4 * max(1.0, full.step_heatmaps.max())
