"""Attention maps of the class tokens: slicing, fused attention, threshold masks, result files."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from narrows.errors import UserError
from narrows.models.vit_tokens import create_vit, last_attention
from narrows.ssl.attention import (
    AttentionResult,
    attention_maps,
    threshold_masks,
    visualise_attention,
)
from tests.tiny import SSL_TINY, SSL_VIT

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_vit(tokens: int, seed: int = 0):
    torch.manual_seed(seed)
    return create_vit(SSL_VIT, num_class_tokens=tokens, img_size=32, **SSL_TINY).eval()


def images(n: int, size: int = 32, seed: int = 1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalised(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def captured_attention(vit, x):
    """timm's own softmax of the last block (unfused path), read by a hook on attn_drop."""
    seen = []
    for block in vit.blocks:
        block.attn.fused_attn = False
    handle = vit.blocks[-1].attn.attn_drop.register_forward_hook(
        lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        vit.forward_features(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("tokens", [1, 2])
def test_maps_are_the_class_rows_over_patch_keys_only(tokens):
    vit = tiny_vit(tokens)
    x = images(3)
    names = ("cls", "cls+")[:tokens]
    maps = attention_maps(vit, x, mean=MEAN, std=STD, tokens=names)
    assert maps.shape == (3, tokens, 3, 4, 4)
    attn = captured_attention(vit, normalised(x))  # [B, h, T, T], T = tokens + 16
    for q in range(tokens):
        # patch p at grid (r, c) is key tokens + 4r + c
        torch.testing.assert_close(maps[:, q].flatten(-2), attn[:, :, q, tokens:],
                                   rtol=1e-5, atol=1e-6)
        total = maps[:, q].sum((-1, -2)) + attn[:, :, q, :tokens].sum(-1)
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        assert (attn[:, :, q, :tokens].sum(-1) > 1e-4).all()  # the class keys really had mass
    if tokens == 2:  # order of the token axis follows the request
        swapped = attention_maps(vit, x, mean=MEAN, std=STD, tokens=("cls+", "cls"))
        torch.testing.assert_close(swapped.flip(1), maps)


def test_fused_attention_gives_the_same_maps():
    vit = tiny_vit(2)
    x = images(2)
    maps = {}
    for fused in (True, False):
        for block in vit.blocks:
            block.attn.fused_attn = fused
        maps[fused] = attention_maps(vit, x, mean=MEAN, std=STD)
    torch.testing.assert_close(maps[True], maps[False], rtol=1e-5, atol=1e-6)


def test_real_registers_are_no_patches_and_no_cls_plus():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(SSL_VIT, num_classes=0, reg_tokens=4, img_size=32,
                            **SSL_TINY).eval()
    x = images(2)
    maps = attention_maps(vit, x, mean=MEAN, std=STD, tokens=("cls",))
    assert maps.shape == (2, 1, 3, 4, 4)
    with torch.no_grad():
        attn = last_attention(vit, normalised(x))
    torch.testing.assert_close(maps[:, 0].flatten(-2), attn[:, :, 0, 5:])
    with pytest.raises(UserError, match="cls\\+"):
        attention_maps(vit, x, mean=MEAN, std=STD, tokens=("cls", "cls+"))


def test_refusals():
    one = tiny_vit(1)
    with pytest.raises(UserError, match="cls\\+"):
        attention_maps(one, images(1), mean=MEAN, std=STD)
    with pytest.raises(UserError, match="multiple of the patch size"):
        attention_maps(tiny_vit(2), images(1, size=30), mean=MEAN, std=STD)
    with pytest.raises(UserError):
        threshold_masks(torch.rand(2, 2), 0.0)


def brute_force_size(values, threshold):
    """Fewest patches whose mass is at least ``threshold`` of the total (every subset)."""
    total = sum(values)
    for size in range(1, len(values) + 1):
        if any(sum(c) >= threshold * total for c in itertools.combinations(values, size)):
            return size
    raise AssertionError


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.6, 0.9, 1.0])
def test_threshold_masks_are_minimal_and_hold_the_mass(threshold):
    g = torch.Generator().manual_seed(int(threshold * 100))
    maps = torch.rand(2, 3, 3, 3, generator=g) ** 3  # peaked, 9 patches per map
    masks = threshold_masks(maps, threshold)
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    for m, k in zip(maps.flatten(0, 1).flatten(-2), masks.flatten(0, 1).flatten(-2), strict=True):
        values = m.double().tolist()
        assert int(k.sum()) == brute_force_size(values, threshold)
        assert float(m.double()[k].sum()) >= threshold * sum(values) - 1e-12
        if (~k).any():  # the largest patches are the kept ones
            assert float(m[k].min()) >= float(m[~k].max())


def backbone(tokens: int = 2):
    return SimpleNamespace(vit=tiny_vit(tokens), mean=MEAN, std=STD, input_size=32,
                           id=f"tiny@init-{tokens}", layout="narrows-card")


def test_result_from_data_round_trips_and_draws(tmp_path):
    from narrows.data.specs import load
    from narrows.plotting import pyplot
    from narrows.ssl.backbones import load_eval_backbone
    from narrows.ssl.eval_options import AttentionOptions

    open_before = set(pyplot().get_fignums())  # other tests of this process may leave some

    data = load("shapes:classes=3,size=32,train=12,test=9")
    real = load_eval_backbone(model=SSL_VIT, model_kwargs=dict(SSL_TINY), image_size=32)
    result = visualise_attention(real, data, AttentionOptions(images=3, threshold=0.6))
    assert result.maps.shape == (3, 2, 3, 4, 4) and result.maps.dtype == torch.float16
    assert result.images.shape == (3, 3, 32, 32) and result.images.dtype == torch.uint8
    x = torch.stack([data.test()[int(n.rsplit("-", 1)[1])][0] for n in result.names])
    want = attention_maps(real.vit, x, mean=real.mean, std=real.std).half()
    torch.testing.assert_close(result.maps, want)
    rows = result.to_rows()
    assert len(rows) == 3 * 2 * 3
    assert all(0 < r["mask_area"] <= 1 and 0 <= r["entropy"] <= 16 ** 0.5 * 2 for r in rows)
    assert "\n" not in result.summary() and "cls+" in result.summary()
    path = result.save(tmp_path / "run")
    import json

    assert json.loads(path.read_text())["format"] == "narrows.ssl.attention/1"
    again = AttentionResult.load(tmp_path / "run")
    assert again.to_rows() == rows and torch.equal(again.images, result.images)
    fig, ax = result.plot()
    assert fig is ax.figure
    pyplot().close(fig)
    fig, ax0 = pyplot().subplots()
    assert result.plot(ax=ax0) == (fig, ax0)
    pyplot().close(fig)
    written = result.save_figures(tmp_path / "out")
    assert len(written) == 4 and all(p.stat().st_size > 0 for p in written)
    assert (tmp_path / "out" / "attention-grid.png").is_file()
    assert set(pyplot().get_fignums()) <= open_before  # save_figures closed all it drew


def test_image_files_are_resized_and_one_token_models_draw_cls(tmp_path):
    from PIL import Image

    from narrows.ssl.eval_options import AttentionOptions

    files = []
    for i, size in enumerate([(50, 40), (20, 20)]):
        file = tmp_path / f"pic{i}.png"
        Image.new("RGB", size, (40 * i, 100, 200)).save(file)
        files.append(str(file))
    result = visualise_attention(backbone(1), files, AttentionOptions(tokens=["cls"]))
    assert result.names == ["pic0", "pic1"] and result.maps.shape == (2, 1, 3, 4, 4)
    assert result.threshold is None and result.to_rows()[0]["mask_area"] is None
    with pytest.raises(UserError, match="cls\\+"):
        visualise_attention(backbone(1), files, AttentionOptions())
    # --image files win over a data set
    from narrows.data.specs import load

    data = load("shapes:classes=3,size=32,train=6,test=6")
    again = visualise_attention(backbone(1), data, AttentionOptions(tokens=["cls"], image=files))
    assert again.names == ["pic0", "pic1"] and torch.equal(again.maps, result.maps)
