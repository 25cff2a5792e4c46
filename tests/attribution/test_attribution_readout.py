"""Readout bottleneck (spec §6) on a random-init CIFAR ResNet-20 with 16×16 inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny import quietly, random_batches, seeded_model
from torch import nn

from narrows.attribution.readout import (
    CHECKPOINT,
    ReadoutBottleneck,
    ReadoutIBA,
    ReadoutStatistics,
    default_readout_layers,
    estimate_readout_statistics,
    train_readout,
)
from narrows.errors import UserError
from narrows.models.cifar_resnet import resnet20_cifar

torch.set_num_threads(2)
SIZE = 16


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return seeded_model("resnet20_cifar", num_classes=10).eval()


@pytest.fixture(scope="module")
def stats(net: nn.Module) -> ReadoutStatistics:
    return _statistics(net)


def _statistics(net: nn.Module) -> ReadoutStatistics:
    """Readout statistics of ``net`` on three seeded random batches."""
    return quietly(estimate_readout_statistics, net, random_batches(3, 16, SIZE, seed=1),
                   n_samples=48)


def _data(n_batches: int = 2, batch: int = 4, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]


def _readout(net: nn.Module, stats: ReadoutStatistics, **kw) -> ReadoutBottleneck:
    torch.manual_seed(5)
    return ReadoutBottleneck(net, stats, **kw)


def test_default_layers() -> None:
    assert default_readout_layers(resnet20_cifar()) == ("layer1", ("layer1", "layer2", "layer3"))

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i in range(1, 5):
                setattr(self, f"layer{i}", nn.Identity())

    assert default_readout_layers(Res()) == ("layer1", ("layer1", "layer2", "layer3", "layer4"))
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    vgg = nn.Module()
    vgg.features = nn.Sequential(*layers)
    assert default_readout_layers(vgg) == (
        "features.10", ("features.10", "features.17", "features.24", "features.28"))
    with pytest.raises(UserError):
        default_readout_layers(nn.Linear(2, 2))


def test_shapes_and_widths(net: nn.Module, stats: ReadoutStatistics) -> None:
    assert stats.bottleneck.shape == (16, SIZE, SIZE)
    ro = _readout(net, stats)
    f_in = 16 + 32 + 64 + 10
    assert ro.conv1.in_channels == f_in and ro.conv1.out_channels == f_in // 2
    assert ro.conv2.out_channels == 32 and ro.conv3.out_channels == 16  # variant B: K = 2·F_out
    assert _readout(net, stats, variant="A").conv2.out_channels == 4
    assert [n for n, _ in ro.named_parameters()] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias"]
    x = torch.randn(3, 3, SIZE, SIZE)
    maps, logits = ro.readouts(x)
    alpha = ro.predict_alpha(maps, logits)
    assert alpha.shape == (3, 16, SIZE, SIZE)
    assert alpha.min() >= -5 and alpha.max() <= 5 and (alpha - 5).abs().max() < 0.5  # init ≈ 5
    noisy, cap = ro(x)
    assert noisy.shape == (3, 10) and cap.shape == (3, 16, SIZE, SIZE)
    assert torch.isfinite(cap).all() and (cap >= -1e-5).all()


def test_efficient_first_conv_equals_naive(net: nn.Module, stats: ReadoutStatistics) -> None:
    ro = _readout(net, stats)
    naive = _readout(net, stats, naive=True)
    naive.load_state_dict(ro.state_dict())
    with torch.no_grad():  # make the prediction depend visibly on the inputs
        for m in (ro, naive):
            m.conv3.weight.mul_(1e3)
    x = torch.randn(2, 3, SIZE, SIZE)
    maps, logits = ro.readouts(x)
    torch.testing.assert_close(ro.predict_alpha(maps, logits), naive.predict_alpha(maps, logits),
                               atol=1e-4, rtol=1e-4)


def test_hooks_removed_and_model_unchanged(net: nn.Module, stats: ReadoutStatistics) -> None:
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = net(x)
    params = {k: v.clone() for k, v in net.state_dict().items()}
    ro = _readout(net, stats)
    ro(x)
    ReadoutIBA(ro).attribute(x, 1)
    for module in net.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, atol=0, rtol=0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, params[k])
    assert "model" not in dict(ro.named_children())


def test_training_changes_readout_only(net: nn.Module, stats: ReadoutStatistics) -> None:
    ro = _readout(net, stats)
    start = {k: v.clone() for k, v in ro.state_dict().items()}
    model_state = {k: v.clone() for k, v in net.state_dict().items()}
    data = _data(n_batches=1, batch=4)
    lines: list[str] = []
    hist = train_readout(net, ro, lambda epoch: data, epochs=4, lr=1e-2, progress=False,
                         log=lines.append)
    assert len(hist) == 4 and len(lines) == 4
    assert all(math.isfinite(h["loss"]) and h["samples"] == 4 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert not torch.equal(ro.conv1.weight, start["conv1.weight"])
    for k, v in net.state_dict().items():
        assert torch.equal(v, model_state[k])
    assert not net.training and all(p.requires_grad for p in net.parameters())


def test_resume_equals_uninterrupted(tmp_path, net: nn.Module, stats: ReadoutStatistics) -> None:
    def factory(epoch: int):
        return _data(n_batches=2, batch=4, seed=100 + epoch)

    full = _readout(net, stats)
    hist_full = train_readout(net, full, factory, epochs=3, lr=1e-3, out_dir=tmp_path / "a",
                              progress=False, log=None, seed=7)
    part = _readout(net, stats)
    train_readout(net, part, factory, epochs=2, lr=1e-3, out_dir=tmp_path / "b",
                  progress=False, log=None, seed=7)
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    resumed = _readout(net, stats)  # fresh object, state comes from the checkpoint
    lines: list[str] = []
    hist = train_readout(net, resumed, factory, epochs=3, lr=1e-3, out_dir=tmp_path / "b",
                         progress=False, log=lines.append, seed=7)
    assert "resuming" in lines[0]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert hist[-1]["loss"] == hist_full[-1]["loss"]
    again = train_readout(net, resumed, factory, epochs=3, out_dir=tmp_path / "b",
                          progress=False, log=None)
    assert len(again) == 3  # nothing left to do


def test_min_std_clamp_keeps_capacity_finite(net: nn.Module, stats: ReadoutStatistics) -> None:
    s = _statistics(net)
    # a (near-)constant unit: zero variance in the bottleneck and in a readout layer
    s.bottleneck._m2[0] = 0.0
    s.bottleneck._sumsq[0] = 0.0
    s.readouts["layer2"]._m2[3] = 0.0
    assert float(s.bottleneck.std[0].min()) == pytest.approx(0.01)
    ro = _readout(net, s)
    with torch.no_grad():
        ro.conv3.weight.mul_(1e3)
    noisy, cap = ro(torch.randn(2, 3, SIZE, SIZE))
    assert torch.isfinite(cap).all() and torch.isfinite(noisy).all()
    hist = train_readout(net, ro, lambda e: _data(1, 4), epochs=1, lr=1e-3, progress=False,
                         log=None)
    assert math.isfinite(hist[0]["loss"])


def test_attribute(net: nn.Module, stats: ReadoutStatistics) -> None:
    ro = _readout(net, stats)
    x = torch.randn(5, 3, SIZE, SIZE)
    result = ReadoutIBA(ro, batch_size=2).attribute(x, torch.tensor([0, 1, 2, 3, 4]))
    assert result.heatmaps.shape == (5, SIZE, SIZE)
    assert np.isfinite(result.heatmaps).all() and (result.heatmaps >= 0).all()
    assert result.heatmaps.sum() > 0
    assert result.capacity.shape == (5, 16, SIZE, SIZE)
    assert result.targets == [0, 1, 2, 3, 4]
    assert result.meta["variant"] == "readout" and result.meta["units"] == "bits per input pixel"
    single = ReadoutIBA(ro).attribute(x[0], None)
    assert single.heatmaps.shape == (1, SIZE, SIZE) and len(single.targets) == 1
    # bits scale as in per-sample IBA: heatmap total ≈ Σ capacity / ln 2 (layer1 is full-res)
    total = result.capacity[0].sum() / math.log(2)
    assert result.heatmaps[0].sum() == pytest.approx(total, rel=1e-3)
