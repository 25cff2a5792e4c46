"""Patch and multi-label probes: majority targets, mIoU, average precision, and probes that must
(or must not) succeed on features built from the targets."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from narrows.ssl.dense import (
    MultiLabelResult,
    PatchProbeResult,
    average_precision,
    confusion_matrix,
    confusion_miou,
    multilabel_scores,
    patch_targets,
    train_multilabel_heads,
    train_patch_heads,
)


def probe_options(**changes):
    base = {"lr": [0.001, 0.01, 0.1], "epochs": 20, "batch_size": 64}
    return SimpleNamespace(**{**base, **changes})


def test_patch_targets_by_hand_with_tie():
    mask = torch.tensor([[0, 0, 2, 2],
                         [1, 1, 2, 0],
                         [3, 3, 0, 1],
                         [1, 1, 1, 0]])[None]
    # cells: top-left {0,0,1,1} tie 0 vs 1 -> 0; top-right {2,2,2,0} -> 2;
    # bottom-left {3,3,1,1} tie -> 1; bottom-right {0,1,1,0} tie -> 0
    assert patch_targets(mask, 2).tolist() == [[[0, 2], [1, 0]]]
    assert patch_targets(mask, 1).equal(mask)
    assert patch_targets(mask, 4).tolist() == [[[1]]]  # six 1s, five 0s


def test_patch_targets_against_loop():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (3, 12, 12), generator=g)
    found = patch_targets(masks, 3)
    for n in range(3):
        for i in range(4):
            for j in range(4):
                cell = masks[n, 3 * i: 3 * i + 3, 3 * j: 3 * j + 3].flatten().tolist()
                counts = [cell.count(v) for v in range(4)]
                assert found[n, i, j] == counts.index(max(counts))


def reference_miou(truth, predicted, labels):
    ious = []
    for c in range(labels):
        inter = sum(1 for t, p in zip(truth, predicted, strict=True) if t == c and p == c)
        union = sum(1 for t, p in zip(truth, predicted, strict=True) if t == c or p == c)
        if union:
            ious.append(inter / union)
    return sum(ious) / len(ious), ious


def test_confusion_miou_against_sklearn_and_reference():
    g = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 5, (300,), generator=g)
    predicted = torch.where(torch.rand(300, generator=g) < 0.6, truth,
                            torch.randint(0, 4, (300,), generator=g))
    predicted[predicted == 4] = 3  # label 4 present but never predicted: IoU 0
    miou, per_class = confusion_miou(confusion_matrix(predicted, truth, 6))  # label 5 absent
    expected, _ = reference_miou(truth.tolist(), predicted.tolist(), 6)
    assert miou == pytest.approx(expected)
    assert math.isnan(per_class[5]) and per_class[4] == 0.0
    metrics = pytest.importorskip("sklearn.metrics")
    assert miou == pytest.approx(metrics.jaccard_score(truth, predicted, average="macro"))


def test_average_precision_against_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(2)
    for trial in range(5):
        scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
        positive = torch.rand(40, generator=g) < 0.3
        positive[trial] = True
        assert average_precision(scores, positive) == pytest.approx(
            metrics.average_precision_score(positive.numpy(), scores.numpy()))
    assert math.isnan(average_precision(torch.rand(5), torch.zeros(5, dtype=torch.bool)))


def test_multilabel_scores_by_hand():
    logits = torch.tensor([[2.0, -1.0], [1.0, 1.0], [-3.0, 0.5]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 1]]).bool()
    found = multilabel_scores(logits, targets)
    assert found["exact_match"] == pytest.approx(2 / 3)
    assert found["label_accuracy"] == pytest.approx(5 / 6)
    # label 0: positives ranked 1, 2 -> AP 1; label 1: scores 1.0 (neg), 0.5 (pos) -> AP 1/2
    assert found["map"] == pytest.approx(0.75)


def scenes(n: int, seed: int, labels: int = 4, size: int = 16):
    """Random blocky class maps (4×4 blocks) so that every 4-px patch is one label."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, labels, (n, size // 4, size // 4), generator=g)
    return coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)


def tokens_from(masks: torch.Tensor, labels: int, noise: float, seed: int, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    targets = patch_targets(masks, 4).reshape(len(masks), -1)
    one_hot = torch.nn.functional.one_hot(targets, dim).float()
    return one_hot + noise * torch.randn(one_hot.shape, generator=g)


def test_patch_probe_on_one_hot_tokens_is_near_perfect():
    train, test = scenes(60, 0), scenes(30, 1)
    rows, history, heads = train_patch_heads(
        tokens_from(train, 4, 0.01, 2), train, tokens_from(test, 4, 0.01, 3), test,
        probe_options(lr=[0.5, 5.0], epochs=5, batch_size=16), patch=4, labels=4)
    best = max(rows, key=lambda r: r["miou"])
    assert best["miou"] >= 0.99
    assert best["pixel_miou"] > 0.85  # bilinear logits blur only the block borders
    assert len(history) == 2 * 5 and heads.weight.shape == (2, 4, 8)


def test_patch_probe_on_random_tokens_is_poor():
    train, test = scenes(60, 0), scenes(30, 1)
    g = torch.Generator().manual_seed(4)
    rows, _, _ = train_patch_heads(
        torch.randn(60, 16, 8, generator=g), train, torch.randn(30, 16, 8, generator=g), test,
        probe_options(lr=[0.5, 5.0], epochs=5, batch_size=16), patch=4, labels=4)
    assert max(r["miou"] for r in rows) < 0.3  # chance: about 1/7 for 4 balanced labels


def test_multilabel_probe_on_targets_is_exact():
    g = torch.Generator().manual_seed(5)
    train = torch.rand(120, 4, generator=g) < 0.5
    test = torch.rand(50, 4, generator=g) < 0.5
    final, history, _ = train_multilabel_heads(
        train.float() * 2 - 1, train, test.float() * 2 - 1, test,
        probe_options(lr=[1.0, 10.0], epochs=10), seed=0)
    assert max(r["exact_match"] for r in final) == 1.0
    assert max(r["map"] for r in final) == 1.0
    assert len(history) == 20


def test_results_round_trip(tmp_path):
    import json

    patch = PatchProbeResult(model="m", data="shapes:", layout="narrows-ssl", lrs=[0.1],
                             epochs=2, miou=0.5, pixel_miou=0.4,
                             per_class_iou=[0.6, math.nan, 0.4], class_names=["bg", "a", "b"],
                             best_lr=0.1, rows=[{"lr": 0.1, "miou": 0.5, "pixel_miou": 0.4,
                                                 "per_class_iou": [0.6, math.nan, 0.4]}])
    multi = MultiLabelResult(model="m", data="shapes:", layout="narrows-ssl", lrs=[0.1],
                             epochs=2, rows=[{"feature": "cls", "exact_match": 0.3,
                                              "label_accuracy": 0.7, "map": 0.8,
                                              "best_lr": 0.1}])
    for result, kind in ((patch, "patch_probe"), (multi, "multilabel")):
        path = result.save(tmp_path / f"{kind}.json")
        assert json.loads(path.read_text())["format"] == f"narrows.ssl.{kind}/1"
        back = type(result).load(path)
        assert back.to_rows() == result.to_rows()
        assert "\n" not in result.summary()
        fig, ax = result.plot()
        assert result.plot(ax=ax) == (fig, ax)


# --- orchestrators on a tiny ViT and shapes --------------------------------------------------

SCENES = "shapes:classes=3,size=32,train=32,test=16,objects=2"


@pytest.fixture(scope="module")
def subject():
    from narrows.data import load
    from narrows.ssl.backbones import load_eval_backbone
    from tests.tiny import SSL_TINY, SSL_VIT

    def backbone(tokens: int):
        return load_eval_backbone(model=SSL_VIT, model_kwargs=dict(SSL_TINY),
                                  class_tokens=tokens, seed=0, image_size=32)

    return backbone, load(SCENES)


def test_patch_probe_reads_one_hot_patch_tokens(subject, monkeypatch):
    """Through the orchestrator, with patch tokens = one-hot(majority class) + noise."""
    from narrows.ssl import backbones
    from narrows.ssl.dense import patch_probe

    make, data = subject
    backbone = make(2)

    def fake(backbone_, data_, split, spec, **kwargs):
        assert kwargs["patches"] and not spec
        masks = data_.split(split, "none").class_masks
        targets = patch_targets(masks, backbone_.patch_size).reshape(len(masks), -1)
        g = torch.Generator().manual_seed(len(split))
        tokens = torch.nn.functional.one_hot(targets, 6).float()
        tokens += 0.01 * torch.randn(tokens.shape, generator=g)
        return {"patches": SimpleNamespace(features=tokens, labels=None, from_cache=False)}

    monkeypatch.setattr(backbones, "backbone_features", fake)
    result = patch_probe(backbone, data, probe_options(lr=[3.0, 30.0], epochs=8, batch_size=8),
                         say=None)
    assert result.miou >= 0.99
    assert result.class_names == ["background", "circle", "square", "triangle"]
    assert len(result.per_class_iou) == 4 and result.best_lr in (3.0, 30.0)


def test_patch_probe_on_tiny_vit_with_cache(subject, tmp_path):
    from narrows.runs import RunDir
    from narrows.ssl.dense import patch_probe

    make, data = subject
    opts = probe_options(lr=[0.01, 0.1], epochs=2, batch_size=8)
    result = patch_probe(make(2), data, opts, cache=tmp_path / "cache", run=RunDir(tmp_path / "r"),
                         say=None)
    assert 0 <= result.miou <= 1 and 0 <= result.pixel_miou <= 1
    assert [r["lr"] for r in result.rows] == [0.01, 0.1]
    assert result.layout == "init" and result.data == SCENES
    again = patch_probe(make(2), data, opts, cache=tmp_path / "cache", run=RunDir(tmp_path / "r"),
                        say=None)
    assert again.provenance["compute"]["from_cache"]
    assert again.rows == result.rows  # resumed from the finished state


def test_multilabel_probe_features_per_token_count(subject):
    from narrows.ssl.dense import multilabel_probe

    make, data = subject
    opts = SimpleNamespace(features=["cls", "cls+", "cls|cls+"], lr=[0.01, 0.1], epochs=2,
                           batch_size=256)
    two = multilabel_probe(make(2), data, opts, say=None)
    assert [r["feature"] for r in two.rows] == ["cls", "cls+", "cls|cls+"]
    assert all(0 <= r["exact_match"] <= 1 and 0 <= r["map"] <= 1 for r in two.rows)
    assert len(two.sweep) == 6 and len(two.history) == 12
    notes = []
    one = multilabel_probe(make(1), data, opts, say=notes.append)
    assert [r["feature"] for r in one.rows] == ["cls"]
    assert any("cls+" in note for note in notes)


def test_probes_refuse_unfit_data(subject):
    from dataclasses import replace as dc_replace

    from narrows.data import load
    from narrows.data.base import DataBundle, TensorImageDataset
    from narrows.errors import UserError
    from narrows.ssl.dense import multilabel_probe, patch_probe

    make, data = subject
    single = load("shapes:classes=3,size=32,train=6,test=3")
    with pytest.raises(UserError, match="objects"):
        multilabel_probe(make(2), single, SimpleNamespace(features=["cls"], lr=[0.1], epochs=1,
                                                          batch_size=256),
                         say=None)
    plain = TensorImageDataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4))
    other = DataBundle(dc_replace(data.info, name="cifar10", spec="cifar10"),
                       {"train": lambda a: plain, "test": lambda a: plain})
    with pytest.raises(UserError, match="shapes"):
        patch_probe(make(2), other, probe_options(), say=None)
