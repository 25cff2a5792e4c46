"""``--log tensorboard`` end to end: narrows train and narrows ssl train give curves that
TensorBoard reads; a missing package is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import sys

import pytest

from narrows.cli import main

QUIET = ["--device", "cpu", "--threads", "1", "--no-progress"]


def _events(directory):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(directory), size_guidance={"scalars": 0,
                                                                          "images": 0})
    events.Reload()
    return events


def test_train_logs_its_curves_to_tensorboard(tmp_path):
    out = tmp_path / "train"
    assert main(["train", "--data", "shapes:classes=2,size=16,train=40,test=20", "--epochs", "2",
                 "--batch-size", "16", "--out", str(out), "--log", "tensorboard", *QUIET]) == 0
    events = _events(out / "tensorboard")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # one loss per optimisation step (3 batches of 40 images, 2 epochs), one point per epoch
    assert [e.step for e in events.Scalars("train/loss")] == list(range(6))
    assert [e.step for e in events.Scalars("epoch/test_top1")] == [2, 5]  # their last steps
    assert [round(e.value, 5) for e in events.Scalars("epoch/test_top1")] == [
        round(row["test_top1"], 5) for row in metrics]
    assert "curves" in events.Tags()["images"]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_ssl_train_logs_its_curves_to_tensorboard(tmp_path):
    out = tmp_path / "ssl"
    assert main(["ssl", "train", "--preset", "smoke", "--data",
                 "shapes:classes=2,size=32,train=32,test=16", "--epochs", "2", "--no-knn",
                 "--out", str(out), "--log", "tensorboard", *QUIET]) == 0
    events = _events(out / "tensorboard")
    scalars = events.Tags()["scalars"]
    assert any(tag.startswith("train/") and "loss" in tag for tag in scalars), scalars
    assert [e.value for e in events.Scalars("epoch/epoch")] == [1, 2]
    steps = [e.step for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("epoch/epoch")] == [len(steps) // 2 - 1, steps[-1]]


@pytest.mark.parametrize("kind, extra", [("tensorboard", "narrows[tensorboard]"),
                                         ("wandb", "narrows[wandb]")])
def test_a_missing_logging_package_names_its_extra_and_writes_nothing(tmp_path, capsys,
                                                                      monkeypatch, kind, extra):
    monkeypatch.setitem(sys.modules, kind, None)
    out = tmp_path / "run"
    assert main(["train", "--data", "shapes:classes=2,size=16,train=8,test=8", "--epochs", "1",
                 "--out", str(out), "--log", kind, *QUIET]) == 2
    err = capsys.readouterr().err
    assert extra in err and err.count("\n") == 1, err
    assert not out.exists()


def test_an_unknown_logger_is_refused_by_the_parser(capsys):
    assert main(["train", "--log", "mlflow"]) == 2
    assert "tensorboard" in capsys.readouterr().err
