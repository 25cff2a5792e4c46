"""``narrows attribution stats | explain | evaluate`` on a tiny random-init checkpoint."""

from __future__ import annotations

import csv

import pytest

from narrows.cli import main

TINY = "shapes:classes=2,size=16,train=16,test=8"


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> str:
    return random_checkpoint(TINY)


def test_stats_resumes(checkpoint, tmp_path, capsys):
    args = ["attribution", "stats", "--checkpoint", checkpoint, "--n-samples", "16",
            "--out", str(tmp_path / "stats"), "--no-progress", "--threads", "1"]
    assert main(args) == 0  # --n-samples given: the user's choice, no note
    assert (tmp_path / "stats" / "statistics.pt").is_file()
    out = capsys.readouterr().out
    assert "estimated statistics" in out and "note:" not in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reused statistics" in out and "n=16" in out and "layer=layer2" in out


@pytest.mark.filterwarnings("ignore:feature statistics from only")
def test_explain_writes_pngs_gifs_and_npz(checkpoint, tmp_path):
    import numpy as np

    out = tmp_path / "explain"
    args = ["attribution", "explain", "--checkpoint", checkpoint, "--images", "2", "--steps", "2",
            "--iba-batch", "2", "--n-samples", "16", "--gif", "--out", str(out), "--no-progress",
            "--threads", "1", "--select", "first"]
    assert main(args) == 0
    for i in (0, 1):
        assert (out / f"heatmap_{i}.png").is_file()
        assert (out / f"iba_{i}.gif").is_file()
    with np.load(out / "heatmaps.npz") as data:
        assert data["heatmaps"].shape == (2, 16, 16)
        assert list(data["indices"]) == [0, 1]
    stamp = (out / "heatmap_0.png").stat().st_mtime_ns
    assert main(args) == 0  # resumed: nothing redone
    assert (out / "heatmap_0.png").stat().st_mtime_ns == stamp


@pytest.mark.filterwarnings("ignore:feature statistics from only")
def test_evaluate_table_one_row_per_method(checkpoint, tmp_path, capsys):
    out = tmp_path / "evaluate"
    args = ["attribution", "evaluate", "--checkpoint", checkpoint, "--methods", "iba,random",
            "--metrics", "degradation,bbox", "--images", "4", "--steps", "2", "--iba-batch", "2",
            "--n-samples", "16", "--tile", "4", "--points", "5", "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["iba", "random"]
    assert "degradation_tile4" in rows[0] and "bbox_ratio" in rows[0]
    md = (out / "results.md").read_text()
    assert md.count("\n") == 4 and "degradation 4×4" in md
    assert (out / "degradation.png").is_file() and (out / "heatmaps_iba.npz").is_file()
    assert "| iba |" in capsys.readouterr().out
    # adding a metric on the same --out reuses the cached heatmaps and metrics
    stamp = (out / "heatmaps_iba.npz").stat().st_mtime_ns
    more = [a if a != "degradation,bbox" else "degradation,bbox,sensitivity-n" for a in args]
    assert main([*more, "--n-sets", "3"]) == 2  # --n-sets affects results: refused
    capsys.readouterr()
    assert main(more) == 0
    assert (out / "heatmaps_iba.npz").stat().st_mtime_ns == stamp
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and all(r["sensitivity_n"] and r["sensitivity_n_per_image"]
                                  for r in rows)
    assert (out / "sensitivity_n.png").stat().st_size > 0 and (out / "examples.png").is_file()


@pytest.mark.parametrize("extra, expected", [
    (["--methods", "iba,nonsense"], "unknown method 'nonsense'"),
    (["--data", "digits", "--metrics", "bbox"], "no bounding boxes"),
])
def test_evaluate_mistakes_are_one_line_exit_2(checkpoint, tmp_path, capsys, extra, expected):
    args = ["attribution", "evaluate", "--model", "resnet20_cifar", "--data", TINY,
            "--out", str(tmp_path / "e"), "--no-progress", "--threads", "1", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_explain_unknown_method_exit_2(checkpoint, capsys):
    assert main(["attribution", "explain", "--checkpoint", checkpoint, "--method", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown attribution method 'bogus'" in err
