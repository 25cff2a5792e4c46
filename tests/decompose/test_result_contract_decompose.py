"""The result contract (narrows.runs.results) for every result class of narrows.decompose."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from tiny import same_rows
from torch import nn

from narrows.decompose import ClassIndices
from narrows.decompose.compare import EssentialComparison
from narrows.decompose.curve import Curve, accuracy_curve
from narrows.decompose.essential import EssentialResult, essential_features
from narrows.decompose.extraction import Extraction
from narrows.decompose.histogram import TopKHistogram
from narrows.decompose.mi_compare import MIComparison
from narrows.decompose.mutual_info import MISResult, MITable, mi_table
from narrows.decompose.pipeline import ValidationReport
from narrows.runs.results import Result

matplotlib.use("Agg")

CLASSES, DIM, PER_CLASS = 3, 16, 6


def _data():
    """Class c lights up channels 2c, 2c+1 of 16 pooled features (one pixel each)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    h = 0.1 * torch.rand(len(labels), DIM, generator=gen)
    for i, c in enumerate(labels.tolist()):
        h[i, 2 * c: 2 * c + 2] += 1.0
    return h, labels, list(zip(h[:, :, None, None], labels.tolist(), strict=True))


def _model() -> nn.Module:
    linear = nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        linear.weight.zero_()
        for c in range(CLASSES):
            linear.weight[c, 2 * c: 2 * c + 2] = 1.0
        linear.bias.zero_()
    return nn.Sequential(nn.Flatten(), linear).eval()


def _extraction() -> Extraction:
    h, labels, _ = _data()
    hist = TopKHistogram(CLASSES, DIM, [2, 4], k_mass=4, thresholds=[0.5])
    hist.update(h, labels)
    return Extraction.from_state(hist.state_dict(), 2, 2,
                                 {"model": "tiny", "data": "synthetic", "class_names": list("abc")})


def _essential(seed: int = 0) -> EssentialResult:
    _, _, data = _data()
    indices = ClassIndices([[2 * c, 2 * c + 1] for c in range(CLASSES)], DIM)
    return essential_features(_model(), data, indices, sigmas=[0.5, 1.0], seed=seed)


def _curve() -> Curve:
    _, _, data = _data()
    ex = _extraction()
    curve = accuracy_curve(_model(), data, {"histogram": lambda k: ex.indices(k, 2 if k <= 2
                                                                              else 4),
                                            "random": lambda k: ClassIndices.random(
                                                CLASSES, DIM, k, 0)},
                           [1, 2, 4], normalizer=lambda x: x)
    curve.meta = {"model": "tiny", "data": "synthetic", "seed": 0}
    return curve


def _mi_table() -> MITable:
    ex = _extraction()
    return mi_table({"ours": lambda k: ex.indices(k, 2 if k <= 2 else 4)}, [2, 4],
                    random_draws=2, num_classes=CLASSES, num_channels=DIM)


def _mis() -> MISResult:
    """Built directly: ``mis`` (scikit-learn's kNN estimator) takes seconds to import."""
    matrix = torch.rand(CLASSES, DIM, generator=torch.Generator().manual_seed(0)).double()
    return MISResult(matrix.numpy(), float(matrix.max(dim=0).values.mean()), 18)


def _report() -> ValidationReport:
    results = {"model": "tiny", "data": "synthetic", "n": 18,
               "full": {"top1": 1.0, "top5": 1.0, "loss": 0.5, "n": 18},
               "decomposed": {"top1": 1.0, "top5": 1.0, "loss": 0.6, "n": 18, "k": 2,
                              "indices": "ind.json", "union_size": 6}}
    curve = _curve()
    results["curve"] = curve.to_json()
    return ValidationReport(results, curve, title="tiny")


# (name, build, save into tmp_path -> the file holding the header, load, kind)
CASES = {
    "Extraction": (_extraction, lambda x, p: (x.save(p), p / "histogram.pt")[1],
                   Extraction.load, "decompose.extraction"),
    "ClassIndices": (lambda: _extraction().chosen(),
                     lambda x, p: x.save(p / "indices.json"),
                     lambda p: ClassIndices.load(p / "indices.json"), "decompose.indices"),
    "Curve": (_curve, lambda x, p: (x.save(p), p / "curve.json")[1], Curve.load,
              "decompose.curve"),
    "EssentialResult": (_essential, lambda x, p: x.save(p / "essential.json"),
                        lambda p: EssentialResult.load(p / "essential.json"),
                        "decompose.essential"),
    "MITable": (_mi_table, lambda x, p: x.save(p / "mi.json"),
                lambda p: MITable.load(p / "mi.json"), "decompose.mi_table"),
    "MISResult": (_mis, lambda x, p: x.save(p / "mis.json"),
                  lambda p: MISResult.load(p / "mis.json"), "decompose.mis"),
    "ValidationReport": (_report, lambda x, p: (x.save(p), p / "results.json")[1],
                         ValidationReport.load, "decompose.validation"),
    "EssentialComparison": (lambda: EssentialComparison({"ours": _essential(0),
                                                         "csg": _essential(1)}),
                            lambda x, p: (x.save(p), p / "essential_ours.json")[1],
                            EssentialComparison.load, "decompose.essential"),
    "MIComparison": (lambda: MIComparison(_mi_table(), {"ours": {"mis": 0.25, "images": 18,
                                                                "file": "mis_ours.json"}}),
                     lambda x, p: (x.save(p), p / "mutual_info.json")[1],
                     MIComparison.load, "decompose.mutual_info"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_result_contract(name: str, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from narrows.plotting import pyplot

    build, save, load, kind = CASES[name]
    x = build()
    assert isinstance(x, Result)
    rows = x.to_rows()
    assert rows and all(isinstance(r, dict) for r in rows)
    assert all(v is None or isinstance(v, (str, int, float, bool))
               for r in rows for v in r.values())
    line = x.summary()
    assert isinstance(line, str) and line and "\n" not in line

    file = save(x, tmp_path)
    if file.suffix == ".pt":
        document = torch.load(file, weights_only=True)
    else:
        document = json.loads(file.read_text())
    assert document["format"] == f"narrows.{kind}/1"
    assert document["provenance"]["versions"]["torch"]
    again = load(tmp_path)
    assert same_rows(again.to_rows(), rows)

    plt = pyplot()
    fig, ax = x.plot()
    assert isinstance(fig, Figure)
    plt.close(fig)
    mine, axes = plt.subplots(1, 2 if name == "EssentialComparison" else 1)
    fig, ax = x.plot(ax=axes)
    assert fig is mine and (ax is axes or list(ax) == list(axes))
    drawn = axes if hasattr(axes, "__len__") else [axes]
    assert all(a.has_data() for a in drawn)
    plt.close(mine)


def test_old_files_without_a_header_still_load(tmp_path: Path) -> None:
    x = _curve()
    x.save(tmp_path)
    document = json.loads((tmp_path / "curve.json").read_text())
    (tmp_path / "curve.json").write_text(json.dumps({k: v for k, v in document.items()
                                                    if k not in ("format", "provenance")}))
    assert Curve.load(tmp_path).to_rows() == x.to_rows()
    ind = _extraction().chosen()
    ind.save(tmp_path / "i.json")
    assert "provenance" not in ClassIndices.load(tmp_path / "i.json").meta
    ind.save_upstream(tmp_path / "u.json")
    assert json.loads((tmp_path / "u.json").read_text()) == {
        str(c): row for c, row in enumerate(ind.indices)}


def test_extraction_summary_says_its_diagnostics() -> None:
    ex = _extraction()
    line, found = ex.summary(), ex.diagnostics()
    assert f"union {found['union_size']}" in line
    assert all(f"Ψ({t}) = {psi['overall_median']:.3f}" in line for t, psi in found["psi"].items())
