"""UDI's multi-crop views: samples, photometric ops, seeded data set, collation (spec §2, §3)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as tvf

from narrows.data.base import TensorImageDataset
from narrows.errors import UserError
from narrows.ssl import geometry, views
from narrows.ssl.views import (
    MultiCropViews,
    PhotometricParams,
    ViewDataset,
    ViewOptions,
    apply_photometric,
    collate_views,
    draw_photometric,
    photometric,
)

TINY = ViewOptions(global_size=32, local_size=16, patch_size=4, n_local=2, global_window=3,
                   local_window=2)  # Fg 8 → Sg 4 (corner), Fl 4 → Sl 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image(seed: int, c: int = 3, h: int = 45, w: int = 61) -> torch.Tensor:
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=gen(seed))


def test_sample_layout_and_dtypes():
    s = MultiCropViews(TINY)(image(0), gen(1))
    shapes = {
        "globals": (2, 3, 32, 32), "locals": (2, 3, 16, 16), "src_global": (2, 4, 64),
        "tgt_global": (2, 4, 64), "src_local": (2, 2, 4, 16), "tgt_local": (2, 2, 4, 64),
        "coords_global": (2, 4), "coords_local": (2, 4),
    }
    assert {k: tuple(v.shape) for k, v in s.items()} == shapes
    assert s["globals"].dtype == torch.uint8 and s["locals"].dtype == torch.uint8
    assert s["src_global"].dtype == torch.float32


def test_one_mask_for_both_globals_and_one_for_all_locals(monkeypatch):
    calls = []
    real = geometry.srs_mask

    def spy(size, window, generator):
        mask = real(size, window, generator)
        calls.append((size, mask))
        return mask

    monkeypatch.setattr(geometry, "srs_mask", spy)
    opts = ViewOptions(global_size=32, local_size=16, patch_size=4, n_local=3, global_window=3,
                       local_window=2)
    for seed in range(10):
        calls.clear()
        s = MultiCropViews(opts)(image(seed), gen(seed))
        assert [c[0] for c in calls] == [8, 4]
        mask_g, mask_l = calls[0][1], calls[1][1]
        used_g = s["src_global"].sum(dim=(0, 1)) > 0  # tokens used by A or B
        assert not (used_g & ~mask_g).any()
        used_l = s["src_local"].sum(dim=(0, 1, 2)) > 0  # tokens used by any local crop
        assert not (used_l & ~mask_l).any()


def test_float_and_gray_inputs():
    u8 = image(3)
    a = MultiCropViews(TINY)(u8, gen(5))
    b = MultiCropViews(TINY)(u8.float() / 255, gen(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    gray = MultiCropViews(TINY)(image(4, c=1, h=20, w=13), gen(0))
    assert torch.equal(gray["globals"][:, 0], gray["globals"][:, 2])
    with pytest.raises(UserError):
        MultiCropViews(TINY)(image(4, c=2), gen(0))


def test_crops_are_the_recorded_boxes():
    # a horizontal ramp image: a flipped crop's left column is brighter than its right one
    ramp = torch.linspace(0, 255, 80).round().to(torch.uint8).expand(3, 60, 80).clone()
    opts = ViewOptions(global_size=32, local_size=16, patch_size=4, n_local=2, hflip=0.5)
    for seed in range(10):
        s = MultiCropViews(opts)(ramp, gen(seed))
        for crops, coords in ((s["globals"], s["coords_global"]), (s["locals"], s["coords_local"])):
            for crop, c in zip(crops, coords, strict=True):
                left, right = crop[0, :, 0].float().mean(), crop[0, :, -1].float().mean()
                expect = torch.tensor([c[1], c[3]]) * 255
                assert abs(left - expect[0]) < 12 and abs(right - expect[1]) < 12


def test_options_are_validated():
    with pytest.raises(UserError):
        ViewOptions(global_size=30, patch_size=4)
    with pytest.raises(UserError):
        ViewOptions(global_pairing="inside")
    with pytest.raises(UserError):
        ViewOptions(global_size=8, local_size=8, patch_size=4, global_window=3)


def test_no_local_crops():
    opts = ViewOptions(global_size=32, local_size=16, patch_size=4, n_local=0)
    batch = collate_views([MultiCropViews(opts)(image(i), gen(i)) for i in range(3)])
    assert batch["locals"].shape == (0, 3, 3, 16, 16)
    assert batch["src_local"].shape == (2, 0, 3, 4, 16)


# ---------------------------------------------------------------- photometric

def only(**kw) -> ViewOptions:
    base = dict(global_size=32, local_size=16, patch_size=4, jitter_p=0.0, grayscale_p=0.0,
                blur_branch_p=1.0, blur_p=(0.0, 0.0), solarize_p=0.0, blur_p_solarize_branch=0.0)
    base.update(kw)
    return ViewOptions(**base)


def normalise(x: torch.Tensor, o: ViewOptions) -> torch.Tensor:
    return tvf.normalize(x, list(o.mean), list(o.std))


def test_jitter_matches_torchvision_in_the_drawn_order():
    crops = torch.randint(0, 256, (6, 3, 16, 20), dtype=torch.uint8, generator=gen(0))
    o = only(jitter_p=1.0)
    p = draw_photometric(6, o, gen(1))
    out = apply_photometric(crops, p, o)
    ops = [tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue]
    for k in range(6):
        x = crops[k].float() / 255
        for op in p.order[k].tolist():
            x = ops[op](x, float(p.factors[k, op]))
        assert torch.allclose(out[k], normalise(x, o), atol=2e-4)


def test_grayscale_blur_solarize_match_references():
    crops = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=gen(2))
    o = only(grayscale_p=1.0)
    x = crops.float() / 255  # PIL's "L" weights (299, 587, 114)/1000, before rounding
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.allclose(photometric(crops, o, gen(0)), normalise(gray, o), atol=1e-5)
    o = only(blur_p=(1.0, 1.0))
    p = draw_photometric(4, o, gen(3))
    assert p.blur.all()
    out = apply_photometric(crops, p, o)
    for k in range(4):
        sigma = float(p.sigma[k])
        size = 2 * math.ceil(3 * sigma) + 1
        ref = tvf.gaussian_blur(crops[k].float() / 255, [size, size], [sigma, sigma])
        r = size // 2  # borders differ (replicate vs reflect); the interior must agree
        assert torch.allclose(out[k][:, r:-r, r:-r], normalise(ref, o)[:, r:-r, r:-r], atol=1e-4)
    o = only(blur_branch_p=0.0, solarize_p=1.0)
    pil = [torch.from_numpy(__import__("numpy").array(ImageOps.solarize(
        Image.fromarray(c.permute(1, 2, 0).numpy())))).permute(2, 0, 1) for c in crops]
    ref = torch.stack(pil).float() / 255
    assert torch.allclose(photometric(crops, o, gen(0)), normalise(ref, o), atol=1e-5)


def test_both_blur_paths_agree():
    x = torch.rand(3, 3, 40, 57, generator=gen(0))
    sigma = torch.tensor([0.1, 1.3, 2.0])
    assert torch.allclose(views._blur(x, sigma, matmul=True), views._blur(x, sigma, matmul=False), atol=1e-5)


def test_photometric_probabilities():
    p = draw_photometric(40_000, ViewOptions(), gen(0))
    assert abs(p.jitter.float().mean() - 0.8) < 0.01
    assert abs(p.gray.float().mean() - 0.2) < 0.01
    assert abs(p.blur.float().mean() - 0.425) < 0.01
    assert abs(p.solarize.float().mean() - 0.10) < 0.01
    assert not (p.solarize & ~(p.solarize | True)).any()
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(40_000, 4))
    assert p.factors[:, 3].abs().max() <= 0.1 and (p.factors[:, :2] - 1).abs().max() <= 0.4


@pytest.mark.parametrize("seed", range(4))
def test_batch_equals_per_crop(seed):
    crops = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen(seed))
    o = ViewOptions(jitter_p=0.7, grayscale_p=0.3, blur_branch_p=0.5, solarize_p=0.5)
    p = draw_photometric(8, o, gen(seed + 100))
    batch = apply_photometric(crops, p, o)
    for k in range(8):
        one = apply_photometric(crops[k:k + 1], p.select(slice(k, k + 1)), o)
        assert torch.allclose(batch[k], one[0], atol=1e-5)
    assert isinstance(p.select(torch.tensor([0, 2])), PhotometricParams)
    with pytest.raises(UserError):
        photometric(crops.float(), o, gen(0))


# ---------------------------------------------------------------- data set and collation

def tiny_set() -> TensorImageDataset:
    images = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8, generator=gen(9))
    return TensorImageDataset(images, torch.zeros(6, dtype=torch.long))


def test_collate_layout():
    data = ViewDataset(tiny_set(), MultiCropViews(TINY), seed=0)
    batch = collate_views([data[i] for i in range(3)])
    shapes = {
        "globals": (2, 3, 3, 32, 32), "locals": (2, 3, 3, 16, 16), "src_global": (2, 3, 4, 64),
        "tgt_global": (2, 3, 4, 64), "src_local": (2, 2, 3, 4, 16), "tgt_local": (2, 2, 3, 4, 64),
        "coords_global": (2, 3, 4), "coords_local": (2, 3, 4),
    }
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert batch["globals"].dtype == torch.float32
    for b in range(3):  # B is the axis after the view/crop axes
        assert torch.equal(batch["src_local"][:, :, b], data[b]["src_local"])
        assert torch.equal(batch["globals"][:, b], data[b]["globals"])


def test_same_seed_epoch_index_gives_the_same_sample_whatever_the_workers():
    base = tiny_set()
    data = ViewDataset(base, MultiCropViews(TINY), seed=7)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=3, num_workers=workers, collate_fn=collate_views)
        runs.append([b for b in loader])
    for b0, b2 in zip(*runs, strict=True):
        assert all(torch.equal(b0[k], b2[k]) for k in b0)
    # the generic path (float images with labels) gives the same samples as the uint8 fast path
    generic = ViewDataset([(base.images[i].float() / 255, 0) for i in range(6)], MultiCropViews(TINY), seed=7)
    assert all(torch.equal(generic[4][k], data[4][k]) for k in data[4])
    first = data[0]["globals"]
    data.set_epoch(1)
    assert not torch.equal(first, data[0]["globals"])
    raw = ViewDataset(base, MultiCropViews(TINY), seed=7, photometric_in_workers=False)
    assert raw[0]["globals"].dtype == torch.uint8


def test_views_module_names():
    assert views.BATCH_DIM.keys() == MultiCropViews(TINY)(image(0), gen(0)).keys()
