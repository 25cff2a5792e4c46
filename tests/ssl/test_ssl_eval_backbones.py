"""The evaluation backbone and its features over a split: one pass for every spec, equal to
running the feature function by hand, cached on disk, reused, and resumed after a kill."""

from __future__ import annotations

import pytest
import torch
from tiny import SSL_TINY, SSL_VIT

import narrows.ssl.backbones as backbones
from narrows.data import load
from narrows.errors import UserError
from narrows.models.features import feature_function
from narrows.ssl.backbones import backbone_features, load_eval_backbone

DATA = "shapes:classes=3,size=32,train=24,test=12,rmin=30,rmax=45"
SPECS = ["cls", "cls+", "cls|cls+", "avgpool", "cls|avgpool@2", "pre-logits"]


@pytest.fixture(scope="module")
def data():
    return load(DATA)


def random_backbone(n_c=2, seed=0):
    return load_eval_backbone(model=SSL_VIT, model_kwargs=SSL_TINY, class_tokens=n_c,
                              seed=seed, image_size=32)


@torch.no_grad()
def by_hand(backbone, data, split, spec):
    dataset = data.split(split, "none")
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return feature_function(backbone.vit, spec)((x - mean) / std)


def test_eval_options_load_without_torch_and_keep_the_recipes():
    import subprocess
    import sys

    code = ("import sys, narrows.ssl.eval_options as e; assert 'torch' not in sys.modules; "
            "f = e.FinetuneOptions(); assert (f.optimizer, f.lr, f.layer_decay, f.epochs) == "
            "('adamw', 1e-3, 0.55, 200); assert e.LinearOptions().feature is None; "
            "assert e.KNNOptions().k == [10, 20, 100, 200]")
    subprocess.run([sys.executable, "-c", code], check=True)
    from narrows.ssl.eval_options import check_feature_spec

    assert check_feature_spec(["cls", "cls|cls+@4", "avgpool", "pre-logits"]) is None
    for bad in ("cls|x", "cls@0", "cls|cls", "pre-logits@2"):
        assert check_feature_spec(bad)


def test_random_backbone_is_seeded_and_named():
    a, b, c = random_backbone(seed=0), random_backbone(seed=0), random_backbone(seed=1)
    assert torch.equal(a.vit.cls_token, b.vit.cls_token)
    assert not torch.equal(a.vit.cls_token, c.vit.cls_token)
    assert a.id == b.id != c.id and a.id.startswith(f"{SSL_VIT}@init-s0")
    assert random_backbone(n_c=1).id != a.id  # the cache never confuses 1 and 2 tokens
    assert a.layout == "init" and a.num_class_tokens == 2 and a.patch_size == 8
    with pytest.raises(UserError):
        load_eval_backbone()


def test_features_in_memory_equal_by_hand(data):
    backbone = random_backbone()
    tables = backbone_features(backbone, data, "test", SPECS, cache=None, batch_size=5, say=None)
    assert list(tables) == ["cls", "cls+", "cls|cls+", "avgpool", "cls|avgpool@2", "pre-logits"]
    labels = torch.tensor([data.test()[i][1] for i in range(12)])
    for key, table in tables.items():
        torch.testing.assert_close(table.features, by_hand(backbone, data, "test", key))
        assert torch.equal(table.labels, labels) and not table.from_cache
    assert tables["cls|cls+"].dim == 96 and tables["cls|avgpool@2"].dim == 3 * 48
    only = backbone_features(backbone, data, "test", [], cache=None, patches=True, say=None)
    assert list(only) == ["patches"]
    patches = only["patches"]
    assert patches.features.shape == (12, 16, 48) and patches.spec is None
    torch.testing.assert_close(patches.features.mean(1),
                               by_hand(backbone, data, "test", "avgpool"))


def test_cls_plus_is_refused_for_one_token(data):
    with pytest.raises(UserError, match="cls\\+"):
        backbone_features(random_backbone(n_c=1), data, "test", ["cls", "cls+"], cache=None,
                          say=None)


def test_cache_is_reused_and_resumed(tmp_path, data, monkeypatch):
    backbone = random_backbone()
    specs = ["cls|cls+@2", "avgpool"]
    plain = backbone_features(backbone, data, "train", specs, cache=None, say=None)

    calls = [0]
    real = backbones.token_parts

    def counted(*args, **kwargs):
        calls[0] += 1
        if kill_after[0] is not None and calls[0] > kill_after[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(backbones, "token_parts", counted)
    kill_after = [1 + 4]  # the shape probe, then 4 of the 6 batches of 4
    with pytest.raises(KeyboardInterrupt):
        backbone_features(backbone, data, "train", specs, cache=tmp_path, batch_size=4,
                          save_every=2, say=None)
    kill_after[0], calls[0] = None, 0
    resumed = backbone_features(backbone, data, "train", specs, cache=tmp_path, batch_size=4,
                                save_every=2, say=None)
    assert calls[0] == 1 + 2  # the probe, then only the two batches after the last save
    for key in specs:
        assert torch.equal(resumed[key].features, plain[key].features)
        assert not resumed[key].from_cache

    calls[0] = 0
    again = backbone_features(backbone, data, "train", specs, cache=tmp_path, batch_size=4,
                              say=None)
    assert calls[0] == 0 and all(t.from_cache and t.seconds == 0 for t in again.values())
    for key in specs:
        assert torch.equal(again[key].features, plain[key].features)
    # fewer blocks and parts are read out of the same store, without a pass
    fewer = backbone_features(backbone, data, "train", ["cls", "cls+"], cache=tmp_path,
                              say=None)
    assert calls[0] == 0 and fewer["cls"].from_cache
    assert torch.equal(fewer["cls"].features, plain["cls|cls+@2"].features[:, 48:96])
    # another split, another backbone: other stores
    other = backbone_features(random_backbone(seed=1), data, "train", specs, cache=tmp_path,
                              say=None)
    assert not other["avgpool"].from_cache
    assert not torch.equal(other["avgpool"].features, plain["avgpool"].features)
    assert len(list(tmp_path.glob("*/*"))) == 2
