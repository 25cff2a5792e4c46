"""IBA: layers, statistics, bottleneck, per-sample fitting and heatmaps (random-init models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from tiny import quietly, random_batches, seeded_model
from torch import nn
from torch.distributions import Normal, kl_divergence

from narrows.attribution import (
    IBA,
    AttributionResult,
    Bottleneck,
    FeatureStatistics,
    bits_per_cell,
    capacity,
    default_layer,
    estimate_statistics,
    get_layer,
    heatmap_from_capacity,
)
from narrows.errors import UserError

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def cifar_net() -> nn.Module:
    return seeded_model("resnet20_cifar", num_classes=10).eval()


@pytest.fixture(scope="module")
def cifar_stats(cifar_net: nn.Module) -> FeatureStatistics:
    batches = random_batches(2, 32, 32, seed=1)
    return quietly(estimate_statistics, cifar_net, "layer2", batches, n_samples=64)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(1, 3, 32, 32)


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, num_classes=10).eval()


# -- layers ----------------------------------------------------------------------------------
def test_get_layer_by_dotted_name_and_close_names(cifar_net: nn.Module) -> None:
    assert get_layer(cifar_net, "layer2") is cifar_net.layer2
    assert get_layer(cifar_net, "layer2.1") is cifar_net.layer2[1]
    with pytest.raises(UserError, match="layer2"):
        get_layer(cifar_net, "layr2")


def test_default_layers(cifar_net: nn.Module) -> None:
    import torchvision

    assert default_layer(torchvision.models.resnet18(num_classes=10)) == "layer2"
    assert default_layer(cifar_net) == "layer2"
    assert default_layer(_tiny_vit()) == "blocks.6"
    vgg16 = nn.Module()
    vgg16.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    assert default_layer(vgg16) == "features.17"
    assert isinstance(get_layer(vgg16, "features.17"), nn.Conv2d)
    stage_model = nn.Module()
    stage_model.stages = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
    assert default_layer(stage_model) == "stages.1"
    with pytest.raises(UserError):
        default_layer(nn.Linear(2, 2))


# -- statistics ------------------------------------------------------------------------------
def test_statistics_match_numpy_over_uneven_batches() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(157, 4, 3, 3))
    data[:, 0] = 0.0  # a dead channel: std clamped, inactive
    data[:150, 1, 0, 0] = 0.0  # 7 / 157 non-zero: active
    stats = FeatureStatistics()
    for lo, hi in [(0, 1), (1, 40), (40, 41), (41, 120), (120, 157)]:
        stats.update(torch.from_numpy(data[lo:hi]).float())
    ref = data.astype(np.float32).astype(np.float64)
    assert stats.n == 157
    np.testing.assert_allclose(stats.mean.numpy(), ref.mean(0), rtol=1e-6, atol=1e-6)
    expected_std = np.maximum(ref.std(0, ddof=1), 0.01)
    np.testing.assert_allclose(stats.std.numpy(), expected_std, rtol=1e-6, atol=1e-6)
    assert not stats.active[0].any() and stats.active[1:].all()
    assert float(stats.std[0].min()) == pytest.approx(0.01)


def test_relu_rms_statistics() -> None:
    x = torch.tensor([[0.0, 1.0], [3.0, 0.0], [4.0, 0.0], [0.0, 0.0]])
    stats = FeatureStatistics("relu_rms")
    stats.update(x[:3])
    stats.update(x[3:])
    assert stats.relu
    assert torch.equal(stats.mean, torch.zeros(2))
    torch.testing.assert_close(stats.std, torch.tensor([math.sqrt(12.5), 1.0]))
    bn = Bottleneck.from_statistics(stats)
    assert bn.relu and not bn.spatial
    assert (bn(torch.randn(50, 2) * 5) >= 0).all()


def test_statistics_round_trip_and_validation(tmp_path, cifar_stats: FeatureStatistics) -> None:
    path = cifar_stats.save(tmp_path / "stats.pt")
    loaded = FeatureStatistics.load(path)
    assert (loaded.layer, loaded.shape, loaded.kind, loaded.n) == ("layer2", (32, 16, 16), "welford", 64)
    assert torch.equal(loaded.mean, cifar_stats.mean) and torch.equal(loaded.std, cifar_stats.std)
    assert torch.equal(loaded.active, cifar_stats.active)
    state = cifar_stats.state()
    state["m2"] = state["m2"][:1]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="m2"):
        FeatureStatistics.load(tmp_path / "bad.pt")
    with pytest.raises(UserError):
        FeatureStatistics.load(tmp_path / "missing.pt")


def test_estimation_stops_at_the_layer_and_warns(cifar_net: nn.Module) -> None:
    calls = []
    handle = cifar_net.layer3.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.warns(UserWarning, match="1,000|1000"):
            stats = estimate_statistics(cifar_net, "layer2", [torch.randn(5, 3, 32, 32)] * 4,
                                        n_samples=8)
    finally:
        handle.remove()
    assert calls == [] and stats.n == 8  # exactly n_samples: the second batch is cut


# -- bottleneck ------------------------------------------------------------------------------
def test_capacity_equals_kl_divergence() -> None:
    torch.manual_seed(0)
    lam = torch.rand(200, dtype=torch.float64) * 0.98 + 0.01
    r_norm = torch.randn(200, dtype=torch.float64) * 2
    ours = capacity(lam, 1 - lam, r_norm, torch.ones(200, dtype=torch.bool))
    reference = kl_divergence(Normal(lam * r_norm, 1 - lam), Normal(0.0, 1.0))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    masked = capacity(lam, 1 - lam, r_norm * float("nan"), torch.zeros(200, dtype=torch.bool))
    assert torch.equal(masked, torch.zeros(200, dtype=torch.float64))


def test_bottleneck_capacity_is_kl_of_its_noise_model() -> None:
    torch.manual_seed(0)
    shape = (3, 6, 6)
    mean, std = torch.randn(shape), torch.rand(shape) + 0.5
    bn = Bottleneck(mean, std, torch.ones(shape, dtype=torch.bool))
    with torch.no_grad():
        bn.alpha.normal_(0, 3)
    r = torch.randn(4, *shape) * 2
    z = bn(r)
    lam, one_minus = bn.lambdas()
    torch.testing.assert_close(lam + one_minus, torch.ones(shape))  # blur is normalised
    # the 5x5 blur with reflect padding: a constant alpha stays constant, a varying one is smoothed
    assert not torch.allclose(lam, torch.sigmoid(bn.alpha))
    reference = kl_divergence(Normal(lam * (r - mean) / std, one_minus), Normal(0.0, 1.0))
    torch.testing.assert_close(bn.capacity, reference, rtol=1e-5, atol=1e-5)
    assert z.shape == r.shape and not torch.equal(z, bn(r))  # fresh noise on every call


def test_large_alpha_is_identity_and_hook_always_detaches(cifar_net, image) -> None:
    shape = (32, 16, 16)
    bn = Bottleneck(torch.zeros(shape), torch.ones(shape), torch.ones(shape, dtype=torch.bool),
                    alpha_init=14.0)
    with torch.no_grad():
        plain = cifar_net(image)
        with bn.attached(cifar_net, "layer2"):
            noisy = cifar_net(image)
            assert bn.capacity is not None and bn.capacity.shape == (1, *shape)
            bn.active = False
            torch.testing.assert_close(cifar_net(image), plain)
    torch.testing.assert_close(noisy, plain, rtol=0, atol=1e-4)
    assert len(cifar_net.layer2._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"), bn.attached(cifar_net, "layer2"):
        raise RuntimeError("boom")
    assert len(cifar_net.layer2._forward_hooks) == 0


def test_one_minus_lambda_is_stable_for_large_alpha() -> None:
    shape = (2, 6, 6)
    bn = Bottleneck(torch.zeros(shape), torch.ones(shape), torch.ones(shape, dtype=torch.bool),
                    alpha_init=30.0)
    bn(torch.randn(3, *shape))
    assert torch.isfinite(bn.capacity).all()


# -- heatmap ---------------------------------------------------------------------------------
def test_heatmap_units_and_size() -> None:
    torch.manual_seed(0)
    cap = torch.rand(8, 4, 4) * 3
    cap[0, 0, 0] = float("nan")
    cells = bits_per_cell(cap)
    assert torch.allclose(cells.sum(), torch.nansum(cap) / math.log(2))
    heat = heatmap_from_capacity(cap, (32, 32))
    assert heat.shape == (32, 32) and (heat >= 0).all()
    assert float(heat.sum()) == pytest.approx(float(cells.sum()), rel=0.05)
    tokens = torch.rand(17, 5)  # class token + 4×4 grid
    cells = bits_per_cell(tokens)
    assert cells.shape == (4, 4)
    torch.testing.assert_close(cells.flatten(), tokens[1:].sum(1) / math.log(2))


# -- per-sample IBA --------------------------------------------------------------------------
def _total_capacity(net, stats, image, beta: float) -> float:
    torch.manual_seed(3)
    result = IBA(net, "layer2", stats, beta=beta, steps=10).attribute(image, 0)
    return float(result.heatmaps.sum())


def test_capacity_falls_as_beta_rises(cifar_net, cifar_stats, image) -> None:
    totals = [_total_capacity(cifar_net, cifar_stats, image, b) for b in (0.1, 10.0, 100.0)]
    assert totals[0] > totals[1] > totals[2] >= 0


def test_targets_int_tensor_and_callable_agree(cifar_net, cifar_stats, image) -> None:
    iba = IBA(cifar_net, None, cifar_stats, steps=3, batch_size=4)
    images = torch.cat([image, image.flip(-1)])
    torch.manual_seed(5)
    by_int = iba.attribute(images, 3)
    torch.manual_seed(5)
    by_tensor = iba.attribute(images, torch.tensor([3, 3]))
    torch.manual_seed(5)
    by_callable = iba.attribute(images, lambda logits: -logits.log_softmax(-1)[:, 3].mean())
    assert by_int.heatmaps.shape == (2, 32, 32) and by_int.targets == [3, 3]
    assert by_callable.targets is None
    np.testing.assert_allclose(by_int.heatmaps, by_tensor.heatmaps)
    np.testing.assert_allclose(by_int.heatmaps, by_callable.heatmaps, rtol=1e-5, atol=1e-9)
    with pytest.raises(UserError):
        iba.attribute(images, torch.tensor([1, 2, 3]))


def test_heatmap_matches_capacity_and_weights_untouched(cifar_net, cifar_stats, image) -> None:
    flags = [p.requires_grad for p in cifar_net.parameters()]
    torch.manual_seed(0)
    result = IBA(cifar_net, "layer2", cifar_stats, steps=2, batch_size=3,
                 record_steps=True).attribute(image[0], 1)
    assert [p.requires_grad for p in cifar_net.parameters()] == flags
    assert all(p.grad is None for p in cifar_net.parameters())
    assert len(cifar_net.layer2._forward_hooks) == 0
    cap = torch.from_numpy(result.capacity[0])
    assert result.capacity.shape == (1, 32, 16, 16)
    assert (result.heatmaps >= 0).all()
    assert float(bits_per_cell(cap).sum()) == pytest.approx(float(cap.sum()) / math.log(2), rel=1e-6)
    np.testing.assert_allclose(result.heatmaps[0], heatmap_from_capacity(cap, (32, 32)).numpy())
    assert result.step_heatmaps.shape == (1, 2, 32, 32)
    np.testing.assert_allclose(result.step_heatmaps[0, -1], result.heatmaps[0])  # T-th forward
    assert result.meta["forwards_per_image"] == 2 and result.meta["layer"] == "layer2"
    torch.manual_seed(0)
    final = IBA(cifar_net, "layer2", cifar_stats, steps=2, batch_size=3,
                final_eval=True).attribute(image[0], 1)
    assert not np.allclose(final.heatmaps, result.heatmaps)


def test_vit_token_layer(image) -> None:
    vit = _tiny_vit()
    layer = default_layer(vit)
    stats = quietly(estimate_statistics, vit, layer, [torch.randn(16, 3, 32, 32)], n_samples=16)
    assert stats.shape == (17, 192)
    torch.manual_seed(0)
    result = IBA(vit, layer, stats, steps=2, batch_size=2).attribute(image, 4)
    assert result.heatmaps.shape == (1, 32, 32) and np.isfinite(result.heatmaps).all()
    assert (result.heatmaps >= 0).all()


def test_result_round_trip_and_plot(tmp_path, cifar_net, cifar_stats, image) -> None:
    torch.manual_seed(0)
    result = IBA(cifar_net, "layer2", cifar_stats, steps=1, batch_size=2).attribute(image, 2)
    loaded = AttributionResult.load(result.save(tmp_path / "run"))
    np.testing.assert_array_equal(loaded.heatmaps, result.heatmaps)
    assert loaded.targets == [2] and loaded.meta["beta"] == 10.0
    fig, ax = loaded.plot(0, image=image[0])
    assert ax.images and fig.axes[-1].get_ylabel() == "bits / pixel"
    with pytest.raises(UserError):
        AttributionResult.load(tmp_path / "nothing")


def test_missing_statistics_is_a_user_error(cifar_net, image) -> None:
    with pytest.raises(UserError, match="statistics"):
        IBA(cifar_net).attribute(image, 0)
