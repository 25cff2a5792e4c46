"""The result contract (narrows.runs.results.Result) for attribution's result classes: save and
load round trip, flat rows, a one-line summary, plot(ax=None) -> (fig, ax), the file header."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

from narrows.attribution.evaluation import EvaluationResult  # noqa: E402
from narrows.attribution.heatmap import AttributionResult  # noqa: E402
from narrows.attribution.metrics import (  # noqa: E402
    BBoxResult,
    DegradationResult,
    RandomisationResult,
    SensitivityNResult,
    bbox_ratio,
    cascading_randomisation,
    degradation,
    sensitivity_n,
)
from narrows.attribution.readout_training import ReadoutRun  # noqa: E402
from narrows.attribution.sanity import SanityResult  # noqa: E402
from narrows.runs.files import read_json_file, read_torch_file  # noqa: E402
from narrows.runs.results import Result  # noqa: E402

H = W = 16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * H * W, 3)).eval()


def _batch(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, H, W, generator=generator), torch.tensor([0, 1, 2][:n])


def _saliency(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    model(x).gather(1, t.view(-1, 1)).sum().backward()
    return x.grad.abs().sum(dim=1)


@functools.cache
def _randomisation() -> RandomisationResult:
    x, t = _batch()
    result = cascading_randomisation(_model(), _saliency, x, t, layers=["3", "0"], repeats=2,
                                     progress=False)
    result.meta = {"method": "saliency", "indices": [0, 1]}
    return result


def _attribution() -> AttributionResult:
    heat = np.random.default_rng(0).random((2, H, W)).astype(np.float32)
    return AttributionResult(heat, targets=[0, 1], meta={"method": "saliency", "seed": 0,
                                                          "units": "|gradient|"})


def _degradation() -> DegradationResult:
    x, t = _batch()
    return degradation(_model(), x, torch.rand(2, H, W), t, tile=8, n_points=3)


def _sensitivity() -> SensitivityNResult:
    x, t = _batch()
    return sensitivity_n(_model(), x, torch.rand(2, H, W), t, tile=8, n_sets=4)


def _bbox() -> BBoxResult:
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[:, 2:6, 3:8] = True
    return bbox_ratio(torch.rand(2, H, W), masks=masks)


def _evaluation() -> EvaluationResult:
    rows = [{"method": "saliency", "degradation_tile8": 0.12, "bbox_ratio": float("nan"),
             "bbox_images": 0}, {"method": "random", "degradation_tile8": 0.01,
                                 "bbox_ratio": 0.2, "bbox_images": 2}]
    curves = {m: {"x": [0.0, 0.5, 1.0], "morf": [1.0, 0.4, 0.1], "lerf": [1.0, 0.8, 0.1]}
              for m in ("saliency", "random")}
    return EvaluationResult(rows=rows, curves=curves, table="| method |\n|---|\n| saliency |\n",
                            files=[Path("results.csv")], tile=8)


def _sanity() -> SanityResult:
    return SanityResult(results={"saliency": _randomisation()}, table="| method |\n",
                        files=[Path("sanity.csv")])


def _readout() -> ReadoutRun:
    history = [{"epoch": e, "loss": 2.0 / e, "ce": 1.0 / e, "capacity": 0.5 / e,
                "samples": 8, "seconds": 0.1} for e in (1, 2)]
    return ReadoutRun(path=Path("readout.pt"), history=history,
                      training={"data": "shapes", "epochs": 2, "seed": 0, "final": history[-1]})


# (name, build, kind in the header, file or directory name, several axes, multi-line summary)
CASES = [
    ("attribution", _attribution, "attribution", "heatmaps", False),
    ("degradation", _degradation, "degradation", "d.pt", False),
    ("sensitivity_n", _sensitivity, "sensitivity_n", "s.pt", False),
    ("bbox", _bbox, "bbox", "b.pt", False),
    ("randomisation", _randomisation, "randomisation", "r.pt", True),
    ("evaluation", _evaluation, "attribution_evaluation", "evaluation.json", False),
    ("sanity", _sanity, "attribution_sanity", "sanity.pt", True),
    ("readout", _readout, "readout_run", "readout_run.json", True),
]
IDS = [case[0] for case in CASES]


@pytest.fixture(scope="module")
def built() -> dict:
    return {name: build() for name, build, *_ in CASES}


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _header_of(path: Path) -> dict:
    if path.is_dir():
        return read_json_file(path / "meta.json", "meta")
    if path.suffix == ".json":
        return read_json_file(path, "result")
    return read_torch_file(path, "result")


@pytest.mark.parametrize("name, build, kind, file, several", CASES, ids=IDS)
def test_round_trip_and_header(built, tmp_path, name, build, kind, file, several):
    result = built[name]
    assert isinstance(result, Result)
    path = tmp_path / file
    result.save(path)
    loaded = type(result).load(path)
    rows, again = result.to_rows(), loaded.to_rows()
    assert len(rows) == len(again)
    for row, other in zip(rows, again, strict=True):
        assert row.keys() == other.keys()
        assert all(_same(row[k], other[k]) for k in row), (row, other)
    document = _header_of(path)
    assert document["format"] == f"narrows.{kind}/1"
    assert torch.__version__.startswith(document["provenance"]["versions"]["torch"])


@pytest.mark.parametrize("name, build, kind, file, several", CASES, ids=IDS)
def test_rows_are_flat(built, name, build, kind, file, several):
    rows = built[name].to_rows()
    assert rows and all(isinstance(row, dict) and row for row in rows)
    for row in rows:
        for key, value in row.items():
            assert isinstance(key, str)
            assert value is None or isinstance(value, (str, int, float, bool)), (key, value)


@pytest.mark.parametrize("name, build, kind, file, several", CASES, ids=IDS)
def test_summary_is_one_line(built, request, name, build, kind, file, several):
    text = built[name].summary()
    assert isinstance(text, str) and text.strip() and "\n" not in text


@pytest.mark.parametrize("name, build, kind, file, several", CASES, ids=IDS)
def test_plot_returns_figure_and_draws_on_given_axes(built, name, build, kind, file, several):
    from matplotlib.figure import Figure

    from narrows.plotting import pyplot

    plt = pyplot()
    result = built[name]
    fig, ax = result.plot()
    assert isinstance(fig, Figure)
    plt.close(fig)
    given_fig, given = plt.subplots(1, 2) if several else plt.subplots()
    fig, ax = result.plot(ax=given)
    assert fig is given_fig
    drawn = list(given) if several else [given]
    assert (list(ax) if several else [ax]) == drawn
    assert all(a.lines or a.collections or a.images for a in drawn)
    plt.close(fig)


def test_files_without_a_header_still_load(tmp_path):
    result = _attribution()
    result.save(tmp_path / "old")
    meta = tmp_path / "old" / "meta.json"
    document = json.loads(meta.read_text())
    meta.write_text(json.dumps({k: document[k] for k in ("targets", "meta")}))
    assert AttributionResult.load(tmp_path / "old").to_rows() == result.to_rows()

    from dataclasses import fields

    old = _randomisation()
    torch.save({f.name: getattr(old, f.name) for f in fields(old)}, tmp_path / "old.pt")
    assert RandomisationResult.load(tmp_path / "old.pt").layers == old.layers


def test_a_file_of_another_kind_is_refused(built, tmp_path):
    from narrows.errors import UserError

    built["bbox"].save(tmp_path / "b.pt")
    with pytest.raises(UserError, match="narrows.bbox/1 result, not narrows.degradation"):
        DegradationResult.load(tmp_path / "b.pt")
