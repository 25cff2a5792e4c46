"""Attribution metrics on models whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from narrows.attribution.metrics import (
    bbox_ratio,
    boxes_to_mask,
    default_ns,
    degradation,
    removal_steps,
    sensitivity_n,
    tile_grid,
)
from narrows.errors import UserError

C, H, W = 3, 16, 16


class Linear(nn.Module):
    """``logits = W · flatten(x) + b`` with seeded weights."""

    def __init__(self, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, C, H, W, generator=gen))
        self.bias = nn.Parameter(torch.randn(classes, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,kchw->nk", x, self.weight) + self.bias


def data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, H, W, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def float64_case(heat_seed: int) -> tuple[Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 model, three images with targets and a seeded random heatmap per image."""
    model = Linear().double().eval()
    images, targets = data(n=3)
    heat = torch.randn(3, H, W, generator=torch.Generator().manual_seed(heat_seed))
    return model, images.double(), targets, heat


def grad_x_input(model: Linear, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Exact per-pixel contributions of a linear model: Σ_c W[y] · x."""
    return (model.weight.detach()[targets] * images).sum(dim=1)


def tile_contributions(heat: torch.Tensor, tile: int) -> torch.Tensor:
    n = heat.shape[0]
    return heat.view(n, H // tile, tile, W // tile, tile).sum(dim=(2, 4)).reshape(n, -1)


def removed_after(contrib: torch.Tensor, descending: bool) -> torch.Tensor:
    """Total contribution removed after 0…T tiles in the given order (``N×(T+1)``)."""
    ordered = contrib.sort(dim=1, descending=descending).values
    zero = torch.zeros(contrib.shape[0], 1, dtype=contrib.dtype)
    return torch.cat([zero, ordered.cumsum(dim=1)], dim=1)


# --- tiles and steps ----------------------------------------------------------------------------


def test_tile_grid_remainder_goes_to_last_row_and_column():
    grid = tile_grid(10, 11, 4)
    assert grid.shape == (10, 11)
    assert int(grid.max()) + 1 == 4  # 2×2 tiles
    assert torch.equal(grid[9, 10], torch.tensor(3)) and int(grid[3, 3]) == 0
    assert torch.bincount(grid.flatten()).tolist() == [16, 28, 24, 42]


def test_removal_steps_cover_clean_and_fully_replaced_image():
    steps = removal_steps(784, 100)
    assert steps.shape == (100,) and steps[0] == 0 and steps[-1] == 784
    assert torch.all(steps[1:] >= steps[:-1])
    expected = [math.floor(j * 784 / 99 + 0.5) for j in range(100)]
    assert steps.tolist() == expected


# --- degradation --------------------------------------------------------------------------------


@torch.no_grad()
def test_degradation_matches_closed_form_for_a_linear_model():
    model = Linear().eval()
    images, targets = data()
    heat = grad_x_input(model, images, targets)
    tile = 4
    res = degradation(
        model, images, heat, targets, tile=tile, baseline=0.0, output="logit", n_points=9
    )
    contrib = tile_contributions(heat, tile).double()  # 8×16; removing a tile drops its part
    clean = model(images).double().gather(1, targets[:, None]).squeeze(1)
    steps = removal_steps(16, 9)
    total = contrib.sum(dim=1, keepdim=True)
    normalised = {}
    for curve, descending in ((res.morf, True), (res.lerf, False)):
        removed = removed_after(contrib, descending)[:, steps]
        torch.testing.assert_close(curve, clean[:, None] - removed, atol=1e-4, rtol=1e-5)
        normalised[descending] = 1 - removed / total
    torch.testing.assert_close(res.morf_normalised, normalised[True], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.lerf_normalised, normalised[False], atol=1e-4, rtol=1e-4)
    assert torch.allclose(res.morf_normalised[:, 0], torch.ones(8, dtype=torch.float64))
    assert torch.allclose(res.lerf_normalised[:, -1], torch.zeros(8, dtype=torch.float64))
    expected_scores = (normalised[False] - normalised[True]).mean(1)
    torch.testing.assert_close(res.scores, expected_scores, atol=1e-4, rtol=1e-4)
    # The exact attribution always separates the raw curves; the normalised score is positive
    # wherever the clean score is above the fully replaced one (the span's sign flips otherwise).
    assert torch.all(res.lerf - res.morf >= -1e-4)
    positive = total.squeeze(1) > 0
    assert positive.any() and torch.all(res.scores[positive] > 0)
    # raw score: area between the mean un-normalised curves, here in closed form
    raw = (removed_after(contrib, True) - removed_after(contrib, False))[:, steps].mean()
    assert res.raw_score == pytest.approx(float(raw), abs=1e-4)
    assert res.median_score == pytest.approx(float(expected_scores.median()), abs=1e-4)


@torch.no_grad()
def test_degradation_softmax_of_two_class_linear_model():
    model = Linear(classes=2).eval()
    images, _ = data()
    targets = torch.zeros(8, dtype=torch.long)
    diff = model.weight[0] - model.weight[1]
    heat = (diff * images).sum(dim=1)
    res = degradation(model, images, heat, targets, tile=8, baseline=0.0, n_points=5)
    contrib = tile_contributions(heat, 8).double()  # 4 tiles
    margin = model(images).double() @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    expected = torch.sigmoid(
        margin[:, None] - removed_after(contrib, True)
    )  # 5 points remove 0…4 tiles
    torch.testing.assert_close(res.morf, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_random_heatmap_degradation_is_about_zero_and_antisymmetric():
    model = Linear().eval()
    images, targets = data(n=64, seed=3)
    gen = torch.Generator().manual_seed(5)
    heat = torch.randn(64, H, W, generator=gen)
    res = degradation(model, images, heat, targets, tile=2, n_points=20, batch_size=256)
    spread = float(res.scores.std()) / math.sqrt(64)
    assert abs(res.score) < 4 * spread + 1e-3
    # MoRF of -h is LeRF of h when there are no ties, so the score flips sign exactly.
    flipped = degradation(model, images, -heat, targets, tile=2, n_points=20, batch_size=256)
    assert flipped.score == pytest.approx(-res.score, abs=1e-9)
    assert flipped.raw_score == pytest.approx(-res.raw_score, abs=1e-9)
    raw_spread = float((res.lerf - res.morf).mean(dim=1).std()) / math.sqrt(64)
    assert abs(res.raw_score) < 4 * raw_spread + 1e-3


@torch.no_grad()
def test_degradation_is_batch_size_invariant():
    # float64 so that the model's own summation order cannot differ between batch sizes
    model, images, targets, heat = float64_case(heat_seed=2)
    kwargs = dict(tile=4, n_points=7)
    one = degradation(model, images, heat, targets, batch_size=1, **kwargs)
    many = degradation(model, images, heat, targets, batch_size=64, **kwargs)
    torch.testing.assert_close(one.morf, many.morf, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(one.lerf, many.lerf, atol=1e-12, rtol=1e-12)
    assert one.score == pytest.approx(many.score, abs=1e-10)


@torch.no_grad()
def test_degradation_ties_are_seeded_and_deterministic():
    model = Linear().eval()
    images, targets = data(n=2)
    heat = torch.ones(2, H, W)  # every tile ties
    a = degradation(model, images, heat, targets, tile=4, n_points=5, seed=7)
    b = degradation(model, images, heat, targets, tile=4, n_points=5, seed=7)
    c = degradation(model, images, heat, targets, tile=4, n_points=5, seed=8)
    assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf)
    assert not torch.equal(a.morf, c.morf)


@torch.no_grad()
def test_degradation_defaults_mean_baseline_top1_and_degenerate_images():
    model = Linear().eval()
    images, _ = data(n=2)
    images[1] = 0.0  # clean image equals its own mean baseline: cannot normalise
    heat = torch.randn(2, H, W, generator=torch.Generator().manual_seed(0))
    res = degradation(model, images, heat, tile=8, n_points=3)
    assert torch.equal(res.targets, model(images).argmax(1))
    top1 = model(images).softmax(1).max(1).values.double()
    torch.testing.assert_close(res.morf[:, 0], top1, atol=1e-6, rtol=1e-6)
    assert res.n_degenerate == 1 and math.isfinite(res.score)
    row = res.to_rows()[0]
    assert row["metric"] == "degradation" and row["n_degenerate"] == 1


def test_degradation_rejects_bad_shapes():
    model = Linear().eval()
    images, targets = data(n=2)
    with pytest.raises(UserError):
        degradation(model, images, torch.zeros(2, 3, H, W), targets)
    with pytest.raises(UserError):
        degradation(model, images, torch.zeros(2, H, W), targets, baseline="median")


def test_degradation_plot():
    pytest.importorskip("matplotlib")
    model = Linear().eval()
    images, targets = data(n=2)
    res = degradation(model, images, torch.randn(2, H, W), targets, tile=8, n_points=3)
    fig, ax = res.plot()
    assert len(ax.lines) == 2 and ax.figure is fig


# --- bounding box -------------------------------------------------------------------------------


def test_boxes_to_mask_matches_shapes_boxes():
    from narrows.data.shapes import generate_split

    ds = generate_split("test", 6, classes=4, size=32, seed=0)
    for box, mask in zip((ds.boxes(i) for i in range(len(ds))), ds.masks, strict=True):
        rect = boxes_to_mask(box, 32, 32)
        x0, y0, x1, y1 = (int(v) for v in box[0].tolist())
        assert int(rect.sum()) == (x1 - x0) * (y1 - y0)
        assert not torch.any(mask & ~rect)  # the box holds the whole shape


def test_bbox_union_of_boxes_and_pixel_edges():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    mask = boxes_to_mask(boxes, 4, 4)
    assert int(mask.sum()) == 7 and not mask[3].any() and not mask[:, 3].any()


def test_bbox_oracle_heatmap_scores_one():
    ds_masks = torch.zeros(5, H, W, dtype=torch.bool)
    for i in range(5):
        ds_masks[i, i : i + 4, 2 * i : 2 * i + 5] = True
    for ties in ("random", "average"):
        res = bbox_ratio(ds_masks.float(), masks=ds_masks, ties=ties)
        assert res.mean == 1.0 and res.n_used == 5


def test_bbox_random_heatmap_about_box_fraction():
    gen = torch.Generator().manual_seed(0)
    n = 300
    boxes = []
    for _ in range(n):
        x0, y0 = torch.randint(0, 8, (2,), generator=gen).tolist()
        size = torch.randint(3, 9, (2,), generator=gen).tolist()
        boxes.append(torch.tensor([[x0, y0, x0 + size[0], y0 + size[1]]], dtype=torch.float32))
    heat = torch.rand(n, H, W, generator=gen)
    res = bbox_ratio(heat, boxes)
    used = res.ratios[res.used]
    spread = float(used.std()) / math.sqrt(res.n_used)
    assert abs(res.mean - res.mean_box_fraction) < 4 * spread
    # A constant map under the averaged tie rule scores exactly the area fraction.
    flat = bbox_ratio(torch.ones(n, H, W), boxes, ties="average")
    torch.testing.assert_close(flat.ratios[flat.used], flat.box_fractions[flat.used])


def test_bbox_ties_are_deterministic():
    mask = torch.zeros(4, H, W, dtype=torch.bool)
    mask[:, 4:8, 4:8] = True
    heat = torch.ones(4, H, W)
    a = bbox_ratio(heat, masks=mask, seed=3)
    b = bbox_ratio(heat, masks=mask, seed=3)
    assert torch.equal(a.ratios, b.ratios)
    heat[:, 0, :3] = 2.0  # 3 clear winners outside the box, the rest tied
    avg = bbox_ratio(heat, masks=mask, ties="average")
    # n = 16: 3 outside for sure, 13 drawn from 253 tied pixels of which 16 are inside.
    assert avg.ratios[0].item() == pytest.approx(13 * 16 / 253 / 16)


def test_bbox_skips_large_and_empty_boxes():
    boxes = [
        torch.tensor([[0.0, 0.0, 16.0, 8.0]]),  # 50% of the image
        torch.zeros(0, 4),  # no box
        None,
        torch.tensor([[0.0, 0.0, 8.0, 4.0]]),  # 12.5%
    ]
    heat = torch.rand(4, H, W, generator=torch.Generator().manual_seed(0))
    res = bbox_ratio(heat, boxes)
    assert res.used.tolist() == [False, False, False, True]
    assert res.n_used == 1 and res.n_skipped == 3
    assert math.isnan(res.ratios[0]) and not math.isnan(res.ratios[3])
    assert bbox_ratio(heat, boxes, max_box_fraction=0.5).n_used == 2
    row = res.to_rows()[0]
    assert row["n_used"] == 1 and row["mean_box_fraction"] == pytest.approx(0.125)
    with pytest.raises(UserError):
        bbox_ratio(heat)


# --- sensitivity-n ------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("tile", [1, 4])
def test_sensitivity_n_of_exact_linear_attribution_is_one(tile):
    model = Linear().eval()
    images, targets = data(n=4)
    heat = grad_x_input(model, images, targets)
    res = sensitivity_n(model, images, heat, targets, tile=tile, n_sets=12, ns=None)
    assert res.ns == default_ns(H * W // tile**2)
    torch.testing.assert_close(res.attributions, res.deltas, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(res.pooled, torch.ones(len(res.ns), dtype=torch.float64))
    torch.testing.assert_close(res.per_image, torch.ones(len(res.ns), dtype=torch.float64))


@torch.no_grad()
def test_sensitivity_n_batch_size_invariant_and_seeded():
    model, images, targets, heat = float64_case(heat_seed=0)
    kwargs = dict(tile=4, ns=[1, 3, 8], n_sets=5)
    one = sensitivity_n(model, images, heat, targets, batch_size=1, **kwargs)
    many = sensitivity_n(model, images, heat, targets, batch_size=64, **kwargs)
    torch.testing.assert_close(one.deltas, many.deltas, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(one.pooled, many.pooled, atol=1e-10, rtol=1e-10)
    assert torch.equal(one.attributions, many.attributions)
    rows = one.to_rows()
    assert [r["n"] for r in rows] == [1, 3, 8] and rows[0]["metric"] == "sensitivity-n"


def test_sensitivity_n_rejects_bad_n():
    model = Linear().eval()
    images, targets = data(n=2)
    with pytest.raises(UserError):
        sensitivity_n(model, images, torch.zeros(2, H, W), targets, tile=8, ns=[5])


def test_default_ns_are_log_spaced_and_unique():
    ns = default_ns(784)
    assert ns[0] == 1 and ns[-1] == round(0.8 * 784) and ns == sorted(set(ns))
    assert len(default_ns(4096)) == 16
