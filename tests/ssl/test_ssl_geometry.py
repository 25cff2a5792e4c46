"""Crop geometry, SRS masks and maps of UDI's views (spec §2.1, §3, §10.5, §11.4)."""

from __future__ import annotations

import pytest
import torch

from narrows.errors import UserError
from narrows.ssl import geometry
from narrows.ssl.geometry import Crop


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- independent re-implementations

def centres(crop: Crop, size: int, compat: bool) -> torch.Tensor:
    """[size², 2] image positions (pixel-index units) of a crop's token centres, written from the
    spec's formulas (compat: first to last pixel; fixed: patch centres), independent of the code."""
    k = torch.arange(size, dtype=torch.float64)
    if compat:
        f = k / (size - 1) if size > 1 else k
        rows = crop.top + f * (crop.height - 1)
        cols = crop.left + f * (crop.width - 1)
        if crop.flipped:
            cols = crop.left + crop.width - 1 - f * (crop.width - 1)
    else:
        rows = crop.top - 0.5 + (k + 0.5) * crop.height / size
        cols = crop.left - 0.5 + (k + 0.5) * crop.width / size
        if crop.flipped:
            cols = crop.left + crop.width - 0.5 - (k + 0.5) * crop.width / size
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def inside(p: torch.Tensor, crop: Crop, compat: bool) -> torch.Tensor:
    if compat:
        lo = (crop.top, crop.left)
        hi = (crop.top + crop.height - 1, crop.left + crop.width - 1)
    else:
        lo = (crop.top - 0.5, crop.left - 0.5)
        hi = (crop.top + crop.height - 0.5, crop.left + crop.width - 0.5)
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    return ((p > lo_t) & (p < hi_t)).all(-1)


def random_crop(g: torch.Generator, height: int, width: int, scale=(0.1, 1.0)) -> Crop:
    i, j, h, w = geometry.rrc_params(height, width, scale, g)
    return Crop(i, j, h, w, height, width, bool(torch.rand((), generator=g) < 0.5))


# ---------------------------------------------------------------- SRS masks

@pytest.mark.parametrize("size,window", [(14, 3), (6, 2), (8, 3), (7, 2), (5, 5), (9, 4), (4, 1), (3, 2)])
def test_srs_one_sample_per_window_in_a_corner(size, window):
    g = size // window
    span, spare = g * window, size - g * window
    corners = set()
    for seed in range(60):
        mask = geometry.srs_mask(size, window, gen(seed)).view(size, size)
        assert mask.dtype == torch.bool
        assert int(mask.sum()) == g * g
        rows, cols = mask.nonzero().unbind(1)
        fits = [(oi, oj) for oi in {0, spare} for oj in {0, spare}
                if rows.min() >= oi and rows.max() < oi + span and cols.min() >= oj and cols.max() < oj + span]
        ones = torch.ones(g, g, dtype=torch.long)
        ok = [(oi, oj) for oi, oj in fits
              if torch.equal(mask[oi:oi + span, oj:oj + span].reshape(g, window, g, window)
                             .sum(dim=(1, 3)), ones)]
        assert ok, "not one sample per window of any corner region"
        if len(ok) == 1:
            corners.add(ok[0])
    if spare:
        assert {(0, 0), (0, spare), (spare, 0), (spare, spare)} <= corners


def test_srs_counts_of_the_defaults():
    assert int(geometry.srs_mask(14, 3, gen(0)).sum()) == 16
    assert int(geometry.srs_mask(6, 2, gen(0)).sum()) == 9
    with pytest.raises(UserError):
        geometry.srs_mask(4, 5, gen(0))


# ---------------------------------------------------------------- crops and coordinates

def test_rrc_params_and_fallback():
    for seed in range(100):
        i, j, h, w = geometry.rrc_params(37, 53, (0.25, 1.0), gen(seed))
        assert 0 <= i and 0 <= j and i + h <= 37 and j + w <= 53 and h > 0 and w > 0
        assert 3 / 4 - 0.1 <= (w / h) <= 4 / 3 + 0.1 or h * w == 37 * 53
    # impossible scale: 10 attempts fail, centre crop with the ratio clamped to 4/3
    assert geometry.rrc_params(30, 100, (5.0, 6.0), gen(0)) == (0, 30, 30, 40)
    assert geometry.rrc_params(40, 50, (5.0, 6.0), gen(0)) == (0, 0, 40, 50)


def test_coords_flip_encoded():
    c = Crop(3, 5, 10, 20, 41, 101, flipped=False)
    assert torch.allclose(c.coords(), torch.tensor([3 / 40, 5 / 100, 12 / 40, 24 / 100]))
    f = Crop(3, 5, 10, 20, 41, 101, flipped=True)
    assert torch.allclose(f.coords(), torch.tensor([3 / 40, 24 / 100, 12 / 40, 5 / 100]))


def axis_overlap(s1: int, n1: int, s2: int, n2: int) -> int:
    return min(s1 + n1, s2 + n2) - max(s1, s2)


def test_shifted_overlap_half_the_smaller_extent_per_axis():
    height, width = 75, 100
    for seed in range(400):
        g = gen(seed)
        ref = random_crop(g, height, width, (0.02, 0.6))
        box = (ref.top, ref.left, ref.bottom, ref.right)
        scale = (0.02, 0.3) if seed % 2 else (0.25, 1.0)
        i, j, h, w = geometry.shifted_params(height, width, scale, box, g, clamp=False)
        assert axis_overlap(i, h, ref.top, ref.height) >= 0.5 * min(h, ref.height)
        assert axis_overlap(j, w, ref.left, ref.width) >= 0.5 * min(w, ref.width)
        ci, cj, ch, cw = geometry.shifted_params(height, width, scale, box, gen(seed + 10_000))
        assert 0 <= ci <= height - ch and 0 <= cj <= width - cw


def test_compat_shift_uses_row_start_for_the_horizontal_extent():
    # A: rows 0..9, cols 30..39; B drawn at row 0, cols 60..69 (a 20-px gap). Upstream measures the
    # horizontal box as max(69, 39) − min(i=0, rj=30) = 69 (not 39): shift 69 − 10 − 9 + 4.5 = 54.5
    # to the left, so j = 60 − 54 = 6 (B jumps past A). The intended min(j, rj) gives a shift of
    # 20 + 4.5 → j = 36; the fixed rule (pixel extents, shift rounded up) gives 20 + 5 → j = 35.
    assert geometry._shift_compat(0, 60, 10, 10, 0, 30, 9, 39) == (0, 6)
    assert geometry._shift_axis(60, 10, 30, 39) == 35
    assert axis_overlap(35, 10, 30, 10) >= 5


def test_nested_pairing_inside_a():
    for seed in range(200):
        a, b = geometry.global_pair(60, 80, (0.25, 1.0), gen(seed), pairing="nested")
        assert a.top <= b.top and b.bottom <= a.bottom and a.left <= b.left and b.right <= a.right
        assert b.height * b.width <= a.height * a.width
    with pytest.raises(UserError):
        geometry.global_pair(60, 80, (0.25, 1.0), gen(0), pairing="inside")


def test_local_reference_true_union_and_compat():
    a = Crop(10, 5, 20, 30, 100, 120, flipped=False)   # cols 5..34
    b = Crop(15, 50, 30, 40, 100, 120, flipped=True)   # cols 50..89, mirrored
    assert geometry.local_reference(a, b) == (10, 5, 44, 89)
    # upstream: element-wise min of flip-encoded starts, max of ends, then unflipped and rounded
    ca, cb = a.coords(), b.coords()
    box = [min(ca[0], cb[0]), min(ca[1], cb[1]), max(ca[2], cb[2]), max(ca[3], cb[3])]
    i0, i1 = sorted([float(box[0]), float(box[2])])
    j0, j1 = sorted([float(box[1]), float(box[3])])
    upstream = (round(i0 * 99), round(j0 * 119), round(i1 * 99), round(j1 * 119))
    assert upstream != (10, 5, 44, 89)
    assert geometry.local_reference(a, b, compat_upstream=True) == upstream
    for seed in range(50):  # without flips both agree
        g = gen(seed)
        a, b = (Crop(*geometry.rrc_params(50, 70, (0.2, 1.0), g), 50, 70) for _ in range(2))
        assert geometry.local_reference(a, b) == geometry.local_reference(a, b, compat_upstream=True)


# ---------------------------------------------------------------- maps

def check_maps(sources, mask, fs, target, ft, compat):
    src, tgt = geometry.build_maps(sources, mask, fs, target, ft, compat)
    idx = mask.nonzero().squeeze(1)
    s = idx.numel()
    assert src.shape == (len(sources), s, fs * fs) and tgt.shape == (len(sources), s, ft * ft)
    t_centres = centres(target, ft, compat)
    for k, crop in enumerate(sources):
        p = centres(crop, fs, compat)[idx]
        valid = inside(p, target, compat)
        nv = int(valid.sum())
        rows = src[k]
        assert torch.all((rows == 0) | (rows == 1))
        assert torch.equal(rows.sum(1), torch.tensor([1.0] * nv + [0.0] * (s - nv)))
        assert torch.equal(rows[:nv].argmax(1), idx[valid])  # packed, ascending token order
        sums = tgt[k].sum(1)
        assert torch.allclose(sums[:nv], torch.ones(nv), atol=1e-5)
        assert torch.all(sums[nv:] == 0) and torch.all(tgt[k] >= 0)
        # bilinear weights reproduce the point, wherever it lies within the target's centre lattice
        interp = tgt[k, :nv].double() @ t_centres
        lo = t_centres.amin(0)
        hi = t_centres.amax(0)
        pv = p[valid]
        inner = ((pv >= lo - 1e-9) & (pv <= hi + 1e-9)).all(-1)
        assert torch.allclose(interp[inner], pv[inner], atol=1e-3)
        assert inner.all() or not compat
    return src, tgt


@pytest.mark.parametrize("compat", [False, True])
def test_maps_random_pairs(compat):
    for seed in range(15):
        g = gen(seed)
        a, b = geometry.global_pair(45, 61, (0.25, 1.0), g, compat_upstream=compat)
        check_maps([a], geometry.srs_mask(8, 3, g), 8, b, 8, compat)
        ref = geometry.local_reference(a, b, compat)
        locs = geometry.local_crops(45, 61, 3, (0.05, 0.25), ref, g, compat_upstream=compat)
        mask = geometry.srs_mask(4, 2, g)
        check_maps(locs, mask, 4, a, 8, compat)
        check_maps(locs, mask, 4, b, 7, compat)  # a target grid of another size


@pytest.mark.parametrize("size", [14, 8])
def test_identity_pair(size):
    a = Crop(4, 7, 30, 45, 50, 60)  # not square in pixels
    full = torch.ones(size * size, dtype=torch.bool)
    src, tgt = geometry.build_maps([a], full, size, a, size)
    assert torch.equal(src[0], torch.eye(size * size))
    assert (tgt[0] - torch.eye(size * size)).abs().max() < 3e-6
    src, tgt = geometry.build_maps([a], full, size, a, size, compat_upstream=True)
    nv = int(src[0].sum())
    assert nv == (size - 2) ** 2  # 144 of 196 at 14: the strict test rejects the border
    interior = [r * size + c for r in range(1, size - 1) for c in range(1, size - 1)]
    assert torch.equal(src[0, :nv].argmax(1), torch.tensor(interior))
    assert (tgt[0, :nv] - src[0, :nv]).abs().max() < 3e-6


@pytest.mark.parametrize("compat", [False, True])
def test_mirrored_pair_maps_column_b_to_f_minus_1_minus_b(compat):
    size = 14
    a = Crop(4, 7, 30, 45, 50, 60)
    m = Crop(4, 7, 30, 45, 50, 60, flipped=True)
    full = torch.ones(size * size, dtype=torch.bool)
    src, tgt = geometry.build_maps([a], full, size, m, size, compat)
    nv = int(src[0].sum())
    assert nv == (size * size if not compat else (size - 2) ** 2)
    tokens = src[0, :nv].argmax(1)
    mirrored = (tokens // size) * size + (size - 1 - tokens % size)
    expect = torch.zeros(nv, size * size)
    expect[torch.arange(nv), mirrored] = 1
    assert (tgt[0, :nv] - expect).abs().max() < 3e-6
