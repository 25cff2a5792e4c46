"""Upstream UDI/DINO checkpoints: safe reading, key mapping, strict loading; timm exports."""

from __future__ import annotations

import argparse
import json
import os
import pickle

import pytest
import timm
import torch
from tiny import SSL_HEAD, SSL_TINY, SSL_VIT, released_udi_state

from narrows.errors import UserError
from narrows.models.vit_tokens import last_tokens
from narrows.ssl.checkpoints import (
    export_backbone,
    export_metadata,
    load_upstream,
    read_upstream,
    save_export,
    upstream_to_narrows,
)
from narrows.ssl.model import build_pair

VIT, TINY, HEAD = SSL_VIT, SSL_TINY, SSL_HEAD
B, N_LOCAL = 2, 2


def pair(**changes):
    torch.manual_seed(0)
    kwargs = {"num_class_tokens": 2, "img_size": 32, "drop_path_rate": 0.0, **HEAD, **TINY}
    kwargs.update(changes)
    student, teacher = build_pair(VIT, **kwargs)
    with torch.no_grad():  # make the teacher differ from the student, g differ from 1
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(2, B, 3, 16)
    src[..., 0, 5] = src[..., 1, 9] = 1.0
    tgt = torch.zeros(2, B, 3, 16)
    tgt[..., 0, [0, 1, 4, 5]] = 0.25
    tgt[..., 1, 10] = 1.0
    src_l = torch.zeros(2, N_LOCAL, B, 2, 4)
    src_l[..., 0, 3] = 1.0
    tgt_l = torch.zeros(2, N_LOCAL, B, 2, 16)
    tgt_l[..., 0, [5, 6]] = 0.5
    return {"globals": torch.randn(2, B, 3, 32, 32, generator=g),
            "locals": torch.randn(N_LOCAL, B, 3, 16, 16, generator=g),
            "src_global": src, "tgt_global": tgt, "src_local": src_l, "tgt_local": tgt_l}


def upstream_args(**changes):
    values = {"arch": "vit_tiny", "patch_size": 8, "out_dim": 64, "norm_last_layer": False,
              "include_patch": True, "number_cls_token": 2, "use_bn_in_head": False,
              "global_crops_scale": (0.25, 1.0), "lr": 0.0005, "output_dir": "."}
    values.update(changes)
    return argparse.Namespace(**values)


@pytest.fixture()
def upstream_file(tmp_path):
    student, teacher = pair(srs_heads=6)  # upstream's hard-coded SRS heads
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": released_udi_state(student, "module."), "teacher": released_udi_state(teacher),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                "epoch": 5, "args": upstream_args(),
                "udi_loss": {"centering.center": torch.randn(3, 64),
                             "centering.count": torch.ones(3, 1)}}, path)
    return path, student, teacher


def test_upstream_keys_as_released(upstream_file):
    path, _, _ = upstream_file
    raw = torch.load(path, weights_only=False)
    assert raw["student"]["module.backbone.backbone.cls_token"].shape == (1, 2, 48)
    assert "backbone.attn.qkv.weight" in raw["teacher"]
    assert raw["teacher"]["head.2.last_layer.weight_g"].shape == (64, 1)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses the Namespace (§10.12)
        torch.load(path, weights_only=True)


def test_read_upstream(upstream_file):
    path, _, teacher = upstream_file
    found = read_upstream(path)
    assert found["layout"] == "udi" and found["epoch"] == 5
    assert found["args"]["arch"] == "vit_tiny" and isinstance(found["args"], dict)
    assert found["centers"].shape == (3, 64)
    assert not any(k.startswith("module.") for k in found["student"])
    mapped = upstream_to_narrows(found["teacher"])
    assert mapped.keys() == teacher.state_dict().keys()
    for key, value in teacher.state_dict().items():
        assert torch.equal(mapped[key], value), key


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_upstream_checkpoint_loads_strictly_and_reproduces_outputs(upstream_file, which):
    path, student, teacher = upstream_file
    source = teacher if which == "teacher" else student
    model, found = load_upstream(path, which=which)
    assert model.srs.heads == 6 and model.num_class_tokens == 2
    assert model.head.last_layer.weight_g.requires_grad  # norm_last_layer False in the args
    data = batch()
    with torch.no_grad():
        a, b = model.forward_teacher(data), source.forward_teacher(data)
        torch.testing.assert_close(a.cls, b.cls, rtol=0, atol=0)
        torch.testing.assert_close(a.patch_global.logits, b.patch_global.logits, rtol=0, atol=0)
        torch.testing.assert_close(a.patch_local.logits, b.patch_local.logits, rtol=0, atol=0)
        s_a, s_b = model.forward_student(data), source.forward_student(data)
        torch.testing.assert_close(s_a.plus_local, s_b.plus_local, rtol=0, atol=0)


def test_decoupled_heads_are_refused(upstream_file):
    path, _, teacher = upstream_file
    state = released_udi_state(teacher)
    state["head.1.mlp.0.bias"] = state["head.1.mlp.0.bias"] + 1.0
    with pytest.raises(UserError, match="head.1"):
        upstream_to_narrows(state)


def test_dino_full_checkpoint_layout(tmp_path):
    student, teacher = pair(num_class_tokens=1, patch_level=False)
    path = tmp_path / "dino.pth"
    torch.save({"student": {"module." + k: v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict(), "epoch": 1,
                "args": upstream_args(arch="vit_tiny"),
                "dino_loss": {"center": torch.zeros(1, 64)}}, path)
    model, found = load_upstream(path)
    assert found["layout"] == "dino" and model.srs is None and model.num_class_tokens == 1
    data = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_teacher(data).cls,
                                   teacher.forward_teacher(data).cls, rtol=0, atol=0)


class Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_without_running(tmp_path, upstream_file):
    path, _, teacher = upstream_file
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"teacher": released_udi_state(teacher), "args": Hostile(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(UserError, match="refused"):
        read_upstream(evil)
    with pytest.raises(UserError):
        load_upstream(evil)
    assert not marker.exists()


def test_missing_file_and_wrong_content(tmp_path):
    with pytest.raises(UserError):
        read_upstream(tmp_path / "nope.pth")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "other.pth")
    with pytest.raises(UserError):
        read_upstream(tmp_path / "other.pth")


@pytest.mark.parametrize("class_tokens", ["keep", "drop"])
def test_export_loads_into_timm(tmp_path, class_tokens):
    _, teacher = pair()
    state, note = export_backbone(teacher, class_tokens=class_tokens)
    metadata = export_metadata(teacher, class_tokens)
    path = save_export(tmp_path / "backbone.safetensors", state, metadata)
    assert ("reg_tokens=1" in note) == (class_tokens == "keep")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        stored = fh.metadata()
    kwargs = json.loads(stored["timm_kwargs"])
    assert stored["timm_name"] == VIT
    vit = timm.create_model(stored["timm_name"], pretrained=False, checkpoint_path=str(path),
                            **kwargs)
    vit.load_state_dict(state, strict=True)
    torch.testing.assert_close(vit.cls_token, teacher.backbone.cls_token, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = teacher.backbone.norm(last_tokens(teacher.backbone, x))
        theirs = vit.forward_features(x)
    if class_tokens == "keep":
        assert stored["class_tokens"] == "cls,cls+"
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    else:
        assert stored["class_tokens"] == "cls" and vit.reg_token is None
        pos = teacher.backbone.pos_embed
        torch.testing.assert_close(vit.pos_embed, torch.cat([pos[:, :1], pos[:, 2:]], 1))
        assert theirs.shape == (2, 1 + 16, 48)


def test_export_from_an_upstream_checkpoint_dict(upstream_file):
    path, student, teacher = upstream_file
    found = read_upstream(path)
    for which, source in (("teacher", teacher), ("student", student)):
        state, _ = export_backbone(found, which=which, class_tokens="drop")
        up_cls = found[which]["backbone.backbone.cls_token"]
        torch.testing.assert_close(state["cls_token"], up_cls[:, :1], rtol=0, atol=0)
        torch.testing.assert_close(state["cls_token"], source.backbone.cls_token, rtol=0, atol=0)
        assert "reg_token" not in state and state["pos_embed"].shape == (1, 17, 48)
    with pytest.raises(UserError):
        export_backbone(found, class_tokens="both")
