"""Values that make no sense only next to the model or the data are refused in one line before
any work (issue 11, item 7 and 11); the cases that needed the model: k beyond the channels,
a Grad-CAM layer given to IBA's --layer, statistics of another model, a tile as big as the image,
a key dimension beyond the embeddings; and the smaller ones (sweep exit code, single ratio)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from narrows.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: userdata.py
from userdata import make_cifar10_tree  # noqa: E402


@pytest.fixture(scope="module")
def digits(random_checkpoint) -> str:
    return random_checkpoint("digits")


@pytest.fixture(scope="module")
def other_digits(random_checkpoint) -> str:
    return random_checkpoint("digits", seed=1)


def refused(capsys, tmp_path, args: list[str], expected: str) -> None:
    out = tmp_path / "out"
    assert main([*args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and " — " in err, err
    assert expected in err, err
    assert not out.exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["decompose", "extract", "--ks", "1000"], "--ks 1000 exceeds the 64 channels"),
    (["decompose", "extract", "-k", "65"], "--k 65 exceeds the 64 channels"),
    (["decompose", "validate", "--ks", "3", "1000"], "--ks 1000 exceeds the 64 channels"),
    (["attribution", "explain", "--method", "gradcam", "--layer", "nosuch"],
     "--layer sets IBA's bottleneck, and gradcam does not use it — pass --cam-layer nosuch"),
    (["attribution", "explain", "--method", "gradcam", "--cam-layer", "nosuch"],
     "the model has no layer 'nosuch'"),
    (["attribution", "evaluate", "--methods", "saliency", "--cam-layer", "layer2"],
     "--cam-layer sets the layer of gradcam"),
    (["attribution", "evaluate", "--methods", "saliency", "--metrics", "degradation", "--tile",
      "32"], "--tile 32 leaves one tile of the 32×32 images"),
])
def test_values_beyond_the_model_or_images(capsys, tmp_path, digits, args, expected):
    refused(capsys, tmp_path, [*args, "--checkpoint", digits], expected)


def test_the_cam_layer_is_used(tmp_path, digits):
    out = tmp_path / "cam"
    assert main(["attribution", "explain", "--checkpoint", digits, "--method", "gradcam",
                 "--cam-layer", "layer2", "--images", "1", "--out", str(out),
                 "--no-progress"]) == 0
    assert '"layer": "layer2"' in (out / "result" / "meta.json").read_text()


def test_statistics_of_another_model_are_refused(capsys, tmp_path, digits, other_digits):
    stats = tmp_path / "stats"
    assert main(["attribution", "stats", "--checkpoint", digits, "--n-samples", "20",
                 "--out", str(stats), "--no-progress"]) == 0
    capsys.readouterr()
    refused(capsys, tmp_path, ["attribution", "explain", "--checkpoint", other_digits,
                               "--statistics", str(stats / "statistics.pt")],
            "were estimated on another model's weights")


def test_unreadable_statistics_say_why_in_a_few_words(capsys, tmp_path, digits):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    refused(capsys, tmp_path, ["attribution", "explain", "--checkpoint", digits,
                               "--statistics", str(bad)],
            "bad.pt is not a readable statistics file (not a torch file, or damaged)")


def test_a_sweep_whose_run_refuses_its_options_exits_2(capsys, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"command: evaluate\noptions:\n  data: digits\ngrid:\n  checkpoint: "
                     f"[{tmp_path / 'missing.pt'}]\n")
    assert main(["kvb", "sweep", str(sweep), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 1 run(s) failed" in err[0] and "missing.pt" in err[0]
    assert (tmp_path / "s" / "results.csv").is_file()  # the table says which run failed


def test_one_ratio_gives_finite_j_without_warnings():
    from narrows.interactions.result import _normalise

    a = np.array([[0.3], [0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.allclose(_normalise(a, [0.5], "uniform"), 1.0)
        assert np.allclose(_normalise(a, [0.5], "sampled"), 1.0)


def test_a_partial_cifar_copy_is_said(tmp_path, capsys):
    from narrows.data import load
    from narrows.notes import forget_notes

    forget_notes()
    spec = make_cifar10_tree(tmp_path, per_batch=2, test=3)
    assert len(load(spec).test()) == 3
    out = capsys.readouterr().out
    assert "warning:" in out and "holds 3 test images, not the official 10,000" in out
