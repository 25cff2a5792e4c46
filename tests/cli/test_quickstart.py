"""The quickstart's steps, on tiny settings (the real run takes minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from narrows.cli import attribution as attribution_cli
from narrows.cli.quickstart import STEPS, QuickstartConfig


def test_every_system_with_a_cli_has_a_quickstart_step() -> None:
    assert [s.name for s in STEPS] == ["train", "evaluate", "interactions", "attribution",
                                        "decompose", "kvb", "ssl"]


def test_attribution_step_trains_explains_and_evaluates(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(attribution_cli, "QUICKSTART_DATA", "shapes:classes=2,size=32,train=64,test=8")
    monkeypatch.setattr(attribution_cli, "QUICKSTART_EPOCHS", 1)
    monkeypatch.setattr(attribution_cli, "QUICKSTART_IMAGES", 3)
    pytest.importorskip("captum")
    summary = attribution_cli.quickstart_step(QuickstartConfig(progress=False, threads=2), tmp_path)
    evaluate = tmp_path / "attribution" / "evaluate"
    table = (evaluate / "results.md").read_text()
    for method in ("iba", "saliency", "gradcam", "random"):
        assert f"| {method} |" in table
    assert (evaluate / "examples.png").stat().st_size > 0
    assert (evaluate / "degradation.png").is_file()
    explain = tmp_path / "attribution" / "explain"
    assert sorted(p.name for p in explain.glob("iba_*.gif")) == [f"iba_{i}.gif" for i in range(4)]
    assert str(evaluate / "results.md") in summary
    from narrows.attribution import AttributionResult
    from narrows.attribution.evaluation import EvaluationResult

    loaded = EvaluationResult.load(evaluate)  # the outputs load in a Python session
    assert [row["method"] for row in loaded.rows] == ["iba", "saliency", "gradcam", "random"]
    assert AttributionResult.load(explain / "result").heatmaps.shape[0] == 4


def test_decompose_step_reports_the_curve(tmp_path: Path, random_checkpoint) -> None:
    import shutil

    from narrows.cli import decompose as decompose_cli

    (tmp_path / "train").mkdir()
    shutil.copy(random_checkpoint("shapes:classes=3,size=16,train=30,test=12"),
                tmp_path / "train" / "best.pt")
    summary = decompose_cli.quickstart_step(QuickstartConfig(progress=False, threads=2), tmp_path)
    validate = tmp_path / "decompose" / "validate"
    assert (validate / "accuracy_vs_k.png").is_file() and str(validate) in summary
    assert (tmp_path / "decompose" / "extract" / "indices.json").is_file()
    from narrows.decompose import Extraction
    from narrows.decompose.pipeline import ValidationReport

    assert Extraction.load(tmp_path / "decompose" / "extract").k == 5
    assert ValidationReport.load(validate).summary()


def test_ssl_step_pretrains_and_reports_knn(tmp_path: Path, monkeypatch) -> None:
    from narrows.cli import ssl as ssl_cli
    from narrows.ssl.result import PretrainResult

    monkeypatch.setattr(ssl_cli, "QUICKSTART", {
        "preset": "smoke", "data": "shapes:classes=2,size=32,train=16,test=8", "epochs": 1,
        "batch_size": 8})
    summary = ssl_cli.quickstart_step(QuickstartConfig(progress=False, threads=2), tmp_path)
    result = PretrainResult.load(tmp_path / "ssl" / "pretraining.json")
    assert set(result.knn) == {"init", "epoch 1"} and "teacher kNN" in summary
    assert (tmp_path / "ssl" / "loss.png").is_file()
