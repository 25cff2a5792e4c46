"""Attribution's one input convention: [0, 1] images plus ``normalizer=`` give exactly what the
same functions give on inputs normalised by hand (the old form, which keeps working)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from narrows.attribution import (
    IBA,
    bbox_ratio,
    degradation,
    estimate_statistics,
    get_method,
    make_method,
    sensitivity_n,
)
from narrows.errors import UserError
from narrows.models.cifar_resnet import resnet20_cifar
from narrows.training import Normalizer

torch.set_num_threads(2)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return resnet20_cifar(num_classes=4).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def normalize() -> Normalizer:
    return Normalizer(MEAN, STD)


@pytest.fixture(scope="module")
def stats(net, normalize):
    data = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_statistics(net, "layer2", [normalize(data)], n_samples=40)


LABELS = torch.tensor([0, 1, 2])


def test_estimate_statistics_takes_a_data_set_of_images_and_the_normaliser(net, normalize):
    data = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    dataset = torch.utils.data.TensorDataset(data, torch.zeros(40, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = estimate_statistics(net, "layer2", [normalize(data[:16]), normalize(data[16:])],
                                  n_samples=30)
        new = estimate_statistics(net, "layer2", dataset, n_samples=30, normalizer=normalize,
                                  batch_size=16)
        loader = estimate_statistics(net, "layer2", torch.utils.data.DataLoader(
            dataset, batch_size=16), n_samples=30, normalizer=normalize)
    for got in (new, loader):
        assert got.n == old.n == 30
        assert torch.allclose(got.mean, old.mean, atol=1e-6, rtol=0)
        assert torch.allclose(got.std, old.std, atol=1e-6, rtol=0)
        assert torch.equal(got.active, old.active)


def test_iba_on_images_with_the_normaliser_equals_iba_on_normalised_inputs(net, images,
                                                                           normalize, stats):
    options = {"steps": 2, "batch_size": 2, "seed": 0}
    old = IBA(net, "layer2", stats, **options).attribute(normalize(images), LABELS)
    new = IBA(net, "layer2", stats, normalizer=normalize, **options).attribute(images, LABELS)
    assert torch.equal(torch.as_tensor(new.heatmaps), torch.as_tensor(old.heatmaps))
    method = get_method("iba")
    for convention in ({"normalizer": normalize}, {"mean": MEAN, "std": STD},
                       {"normalizer": SimpleNamespace(mean=MEAN, std=STD)}):  # a Subject
        got = method(net, "layer2", statistics=stats, steps=2, batch_size=2, seed=0,
                     **convention).attribute(images, LABELS, ids=[0, 1, 2])
        want = method(net, "layer2", statistics=stats, steps=2, batch_size=2,
                      seed=0).attribute(normalize(images), LABELS, ids=[0, 1, 2])
        assert torch.equal(torch.as_tensor(got.heatmaps), torch.as_tensor(want.heatmaps))


def test_a_captum_baseline_on_images_with_the_normaliser(net, images, normalize):
    pytest.importorskip("captum")
    old = get_method("saliency")(net).attribute(normalize(images), LABELS)
    new = get_method("saliency")(net, normalizer=normalize).attribute(images, LABELS)
    assert torch.equal(torch.as_tensor(new.heatmaps), torch.as_tensor(old.heatmaps))
    direct = make_method("saliency", net, normalizer=normalize).attribute(images, LABELS)
    assert torch.equal(direct, make_method("saliency", net).attribute(normalize(images), LABELS))


def test_metrics_on_images_with_the_normaliser(net, images, normalize):
    heatmaps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    options = {"tile": 8, "n_points": 5, "seed": 0}
    old = degradation(net, normalize(images), heatmaps, LABELS, **options)
    new = degradation(net, images, heatmaps, LABELS, normalizer=normalize, **options)
    assert torch.equal(new.morf, old.morf) and torch.equal(new.lerf, old.lerf)
    assert new.score == old.score
    options = {"tile": 8, "ns": [1, 4], "n_sets": 3, "seed": 0}
    old = sensitivity_n(net, normalize(images), heatmaps, LABELS, **options)
    new = sensitivity_n(net, images, heatmaps, LABELS, normalizer=normalize, **options)
    assert torch.equal(new.deltas, old.deltas)


def test_bbox_ratio_of_heatmaps_made_either_way(net, images, normalize, stats):
    old = IBA(net, "layer2", stats, steps=1, batch_size=2, seed=0).attribute(
        normalize(images), LABELS)
    new = IBA(net, "layer2", stats, steps=1, batch_size=2, seed=0,
              normalizer=normalize).attribute(images, LABELS)
    boxes = [torch.tensor([[4.0, 4.0, 16.0, 16.0]])] * 3
    a = bbox_ratio(torch.as_tensor(old.heatmaps), boxes)
    b = bbox_ratio(torch.as_tensor(new.heatmaps), boxes)
    assert torch.equal(torch.as_tensor(new.heatmaps), torch.as_tensor(old.heatmaps))
    assert torch.allclose(a.ratios, b.ratios, equal_nan=True, rtol=0, atol=0)


def test_normaliser_and_mean_std_together_are_refused(net):
    with pytest.raises(UserError, match="normalizer and mean/std"):
        get_method("random")(net, normalizer=Normalizer(MEAN, STD), mean=MEAN, std=STD)
    with pytest.raises(UserError, match="not a function"):
        get_method("random")(net, normalizer=3)


def test_evaluation_caches_carry_the_header_and_old_caches_still_load(random_checkpoint,
                                                                      tmp_path, capsys):
    import json

    import numpy as np

    from narrows.cli import main

    out = tmp_path / "evaluate"
    args = ["attribution", "evaluate", "--checkpoint",
            random_checkpoint("shapes:classes=2,size=16,train=16,test=8"), "--methods", "random",
            "--metrics", "degradation", "--images", "2", "--tile", "4", "--points", "3",
            "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    table = (out / "results.csv").read_text()
    with np.load(out / "heatmaps_random.npz") as data:
        header = json.loads(str(data["header"]))
        heatmaps, indices = data["heatmaps"], data["indices"]
    assert header["format"] == "narrows.attribution_heatmaps/1"
    assert "torch" in header["provenance"]["versions"]
    metric = json.loads((out / "metric_random_degradation.json").read_text())
    assert metric["format"] == "narrows.attribution_metric/1"
    assert metric["provenance"]["options"]["metric"] == "degradation"
    # caches written before headers existed: the same results, nothing recomputed
    np.savez_compressed(out / "heatmaps_random.npz", heatmaps=heatmaps, indices=indices)
    old = {k: v for k, v in metric.items() if k not in ("format", "provenance")}
    (out / "metric_random_degradation.json").write_text(json.dumps(old))
    stamp = (out / "heatmaps_random.npz").stat().st_mtime_ns
    (out / "results.csv").unlink()
    assert main(args) == 0
    assert (out / "heatmaps_random.npz").stat().st_mtime_ns == stamp
    assert (out / "results.csv").read_text() == table
    capsys.readouterr()
