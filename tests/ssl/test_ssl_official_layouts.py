"""Every checkpoint layout an evaluation reads: built here with the real key names, detected,
loaded strictly, and giving the features of the network it was saved from."""

from __future__ import annotations

import argparse

import pytest
import torch
from tiny import SSL_HEAD, SSL_TINY, SSL_VIT, released_udi_state

from narrows.errors import UserError
from narrows.models.features import token_parts
from narrows.models.vit_tokens import create_vit
from narrows.ssl.backbones import load_eval_backbone
from narrows.ssl.checkpoints import LAYOUTS, detect_layout
from narrows.ssl.model import build_pair

TINY_TEXT = ",".join(f"{k}={v}" for k, v in SSL_TINY.items())


def pair(**changes):
    torch.manual_seed(0)
    kwargs = {"num_class_tokens": 2, "img_size": 32, "drop_path_rate": 0.0, **SSL_HEAD, **SSL_TINY}
    kwargs.update(changes)
    student, teacher = build_pair(SSL_VIT, **kwargs)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def extracted(full_state, prefix=""):
    """What UDI's extract_backbone_weights_for_finetuning.py writes: keys starting with
    ``backbone.``, the first ``backbone.`` stripped (so ``backbone.cls_token``, ``attn.*``)."""
    return {prefix + k[len("backbone."):]: v for k, v in full_state.items()
            if k.startswith("backbone.")}


def args(**changes):
    values = {"arch": "vit_tiny", "patch_size": 8, "out_dim": 64, "norm_last_layer": False}
    values.update(changes)
    return argparse.Namespace(**values)


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def same_features(loaded, source_vit):
    x = images()
    ours = token_parts(loaded.vit, x, 2, patches=True)
    theirs = token_parts(source_vit.eval(), x, 2, patches=True)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def udi_pair():
    return pair(srs_heads=6)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_udi_full(tmp_path, udi_pair, which):
    student, teacher = udi_pair
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": released_udi_state(student, "module."), "teacher": released_udi_state(teacher),
                "epoch": 3, "args": args(), "udi_loss": {"centering.center": torch.zeros(3, 64)}},
               path)
    assert detect_layout(path) == "udi-full"
    loaded = load_eval_backbone(path, which=which)
    assert loaded.layout == "udi-full" and loaded.num_class_tokens == 2
    assert f"(udi-full, {which})" in loaded.describe()
    same_features(loaded, (teacher if which == "teacher" else student).backbone)
    assert loaded.id.endswith("-student") == (which == "student")


def test_dino_full(tmp_path):
    student, teacher = pair(num_class_tokens=1, patch_level=False)
    path = tmp_path / "dino.pth"
    torch.save({"student": {"module." + k: v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict(), "args": args(), "epoch": 1}, path)
    assert detect_layout(path) == "dino-full"
    loaded = load_eval_backbone(path)
    assert loaded.num_class_tokens == 1
    same_features(loaded, teacher.backbone)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_udi_backbone_only(tmp_path, udi_pair, prefix):
    _, teacher = udi_pair
    state = extracted(released_udi_state(teacher))
    assert state["backbone.cls_token"].shape == (1, 2, 48) and "attn.qkv.weight" in state
    path = tmp_path / "udi-backbone.pth"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    assert detect_layout(path) == "udi-backbone"
    loaded = load_eval_backbone(path, model_kwargs="num_heads=3")
    assert loaded.num_class_tokens == 2 and loaded.input_size == 32
    assert any("SRS" in note for note in loaded.notes)
    same_features(loaded, teacher.backbone)


@pytest.mark.parametrize("wrapper", [None, "state_dict"])
def test_dino_backbone_only(tmp_path, wrapper):
    torch.manual_seed(1)
    vit = create_vit(SSL_VIT, num_class_tokens=1, img_size=32, **SSL_TINY)
    state = vit.state_dict()
    assert state["cls_token"].shape == (1, 1, 48)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state if wrapper is None else {wrapper: state}, path)
    assert detect_layout(path) == "dino-backbone"
    loaded = load_eval_backbone(path, model_kwargs={"num_heads": 3})
    assert loaded.layout == "dino-backbone" and loaded.num_class_tokens == 1
    same_features(loaded, vit)
    if wrapper is None:  # the heads are not in the tensors: the default (dim // 64) is noted
        guessed = load_eval_backbone(path)
        assert any("heads assumed" in note for note in guessed.notes)


def test_missing_tensor_is_a_strict_error(tmp_path):
    torch.manual_seed(1)
    state = create_vit(SSL_VIT, num_class_tokens=1, img_size=32, **SSL_TINY).state_dict()
    del state["norm.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    assert detect_layout(path) == "dino-backbone"
    with pytest.raises(UserError, match="norm.weight"):
        load_eval_backbone(path, model_kwargs="num_heads=3")


def test_narrows_ssl_and_card(tmp_path):
    from dataclasses import asdict

    from narrows.models import ModelCard, save_model
    from narrows.ssl.model import pair_for
    from narrows.ssl.options import SSLOptions
    from narrows.ssl.trainer import asdict_plain

    options = SSLOptions(model=SSL_VIT, model_kwargs=TINY_TEXT, img_size=32, out_dim=64,
                         head_hidden=64, head_bottleneck=32)
    torch.manual_seed(0)
    student, teacher = pair_for(options)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "narrows.ssl_checkpoint", "version": 1, "student": student.state_dict(),
                "teacher": teacher.state_dict(), "options": asdict_plain(options),
                "data": "shapes:size=32", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
               path)
    assert asdict(options)["img_size"] == 32
    assert detect_layout(path) == "narrows-ssl"
    loaded = load_eval_backbone(path)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.data_spec == "shapes:size=32"
    assert loaded.input_size == 32
    same_features(loaded, teacher.backbone)

    kwargs = {**SSL_TINY, "img_size": 32, "reg_tokens": 1}
    card = ModelCard(architecture=SSL_VIT, num_classes=0, in_chans=3, input_size=32,
                     mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2), data_spec="shapes:size=32",
                     model_kwargs=kwargs)
    import timm

    vit = timm.create_model(SSL_VIT, pretrained=False, num_classes=0, **kwargs)
    vit.load_state_dict(teacher.backbone.state_dict())
    exported = tmp_path / "backbone.safetensors"
    save_model(exported, vit, card)
    assert detect_layout(exported) == "narrows-card"
    loaded = load_eval_backbone(exported)
    assert loaded.num_class_tokens == 2 and loaded.mean == (0.4, 0.4, 0.4)
    same_features(loaded, teacher.backbone)


def test_unknown_layout_is_one_error(tmp_path):
    from narrows.models import create

    net = create("resnet20_cifar", num_classes=10)
    path = tmp_path / "resnet.pth"
    torch.save(net.state_dict(), path)
    with pytest.raises(UserError, match="fits no known checkpoint layout") as info:
        detect_layout(path)
    assert "conv" in info.value.what
    assert all(layout in info.value.fix for layout in LAYOUTS)
    with pytest.raises(UserError, match="does not exist"):
        detect_layout(tmp_path / "nothing.pth")
