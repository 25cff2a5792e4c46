"""``narrows attribution readout-train`` and ``--method readout`` on tiny random-init models."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch

from narrows.cli import main

TINY = "shapes:classes=2,size=16,train=32,test=8"
QUIET = ["--no-progress", "--threads", "1", "--device", "cpu"]  # bitwise resume on CPU
pytestmark = pytest.mark.filterwarnings("ignore:readout statistics from only")


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> str:
    return random_checkpoint(TINY)


def _train_args(checkpoint: str, out, epochs: int = 2) -> list[str]:
    return ["attribution", "readout-train", "--checkpoint", checkpoint, "--epochs", str(epochs),
            "--n-samples", "32", "--batch-size", "8", "--lr", "1e-3", "--out", str(out), *QUIET]


@pytest.fixture(scope="module")
def trained(checkpoint, tmp_path_factory):
    """An uninterrupted two-epoch run: (run directory, its stdout)."""
    out = tmp_path_factory.mktemp("readout") / "run"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(_train_args(checkpoint, out)) == 0
    return out, text.getvalue()


def _net(checkpoint: str):
    from narrows.models import load_model

    return load_model(checkpoint).model.eval()


def _images(n: int = 3) -> torch.Tensor:
    from narrows.data import load
    from narrows.training import Normalizer

    bundle = load(TINY)
    test = bundle.split("test")
    x = torch.stack([test[i][0] for i in range(n)])
    return Normalizer(bundle.info.mean, bundle.info.std)(x)


def test_readout_train_writes_readout_curves_and_metrics(trained) -> None:
    out, text = trained
    for name in ("readout.pt", "readout_curves.png", "readout_statistics.pt", "readout_last.pt",
                 "metrics.jsonl", "results.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert "32 images × 2 epochs × 2 forwards = 128 forwards" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["samples"] == 32 for r in rows)
    state = torch.load(out / "readout.pt", weights_only=True)
    assert state["layer"] == "layer1" and state["readout_layers"] == ["layer1", "layer2", "layer3"]
    assert state["variant"] == "B" and state["input_shape"] == [3, 16, 16]
    assert state["card"]["architecture"] == "resnet20_cifar"
    assert state["training"]["epochs"] == 2 and state["checkpoint"].endswith(".pt")


def test_killed_run_resumes_to_the_same_readout(checkpoint, trained, tmp_path, monkeypatch,
                                                capsys) -> None:
    import narrows.attribution.readout_training as cli

    out = tmp_path / "run"
    original = cli.write_curves

    def killed_after_first_epoch(run, history):
        original(run, history)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_curves", killed_after_first_epoch)
    assert main(_train_args(checkpoint, out)) == 130
    assert (out / "readout_last.pt").is_file() and not (out / "readout.pt").exists()
    monkeypatch.setattr(cli, "write_curves", original)
    capsys.readouterr()
    assert main(_train_args(checkpoint, out)) == 0
    text = capsys.readouterr().out
    assert "reusing readout statistics" in text and "resuming readout training" in text
    assert "1 epochs done" in text
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = torch.load(out / "readout.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(trained[0] / "readout.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    # more epochs on the same --out are refused, as for 'narrows train'
    assert main(_train_args(checkpoint, out, epochs=3)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epochs: 2 → 3" in err


def test_save_load_round_trip_gives_identical_heatmaps(checkpoint, tmp_path) -> None:
    from narrows.attribution.readout import (
        ReadoutBottleneck,
        ReadoutIBA,
        estimate_readout_statistics,
        load_readout,
        save_readout,
    )

    net = _net(checkpoint)
    x = _images(4)
    stats = estimate_readout_statistics(net, [x, x], n_samples=8)
    torch.manual_seed(3)
    readout = ReadoutBottleneck(net, stats, variant="A", sigma=0.5).eval()
    with torch.no_grad():
        readout.conv3.weight.mul_(1e3)  # α depends visibly on the input
    path = save_readout(tmp_path / "r.pt", readout, input_shape=x.shape[1:])
    loaded = load_readout(path, _net(checkpoint))
    assert loaded.variant == "A" and loaded.sigma == 0.5 and loaded.input_shape == (3, 16, 16)
    before = ReadoutIBA(readout).attribute(x).heatmaps
    after = ReadoutIBA(loaded).attribute(x).heatmaps
    assert np.array_equal(before, after) and before.std() > 0


def test_explain_and_evaluate_with_readout(checkpoint, trained, tmp_path) -> None:
    from narrows.attribution.readout import ReadoutIBA, load_readout

    file = str(trained[0] / "readout.pt")
    out = tmp_path / "explain"
    assert main(["attribution", "explain", "--checkpoint", checkpoint, "--method", "readout",
                 "--readout", file, "--images", "3", "--select", "first", "--out", str(out),
                 *QUIET]) == 0
    for i in range(3):
        assert (out / f"heatmap_{i}.png").is_file()
    with np.load(out / "heatmaps.npz") as data:
        maps = data["heatmaps"]
    assert maps.shape == (3, 16, 16)
    expected = ReadoutIBA(load_readout(file, _net(checkpoint))).attribute(_images(3)).heatmaps
    np.testing.assert_allclose(maps, expected, rtol=1e-4)  # one image per batch there

    out = tmp_path / "evaluate"
    assert main(["attribution", "evaluate", "--checkpoint", checkpoint, "--methods",
                 "readout,random", "--readout", file, "--metrics", "bbox", "--images", "4",
                 "--out", str(out), *QUIET]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["readout", "random"] and rows[0]["bbox_ratio"]


def _tampered(trained, tmp_path, change) -> str:
    state = torch.load(trained[0] / "readout.pt", weights_only=True)
    change(state)
    path = tmp_path / "tampered.pt"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("garbage", "is not a readable readout file"),
    ("statistics", "is not a readout file"),
    ("missing-key", "does not fit its own layers and statistics"),
    ("other-weights", "was trained for other model weights (resnet20_cifar"),
    ("no-file", "--method readout needs --readout FILE"),
])
def test_bad_readout_is_one_line_exit_2(checkpoint, trained, tmp_path, capsys, random_checkpoint,
                                        case, expected) -> None:
    ckpt, readout = checkpoint, str(trained[0] / "readout.pt")
    if case == "garbage":
        readout = str(tmp_path / "garbage.pt")
        (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    elif case == "statistics":
        readout = str(trained[0] / "readout_statistics.pt")
    elif case == "missing-key":
        readout = _tampered(trained, tmp_path, lambda s: s["state_dict"].pop("conv2.bias"))
    elif case == "other-weights":
        ckpt = random_checkpoint(TINY, seed=1)
    extra = [] if case == "no-file" else ["--readout", readout]
    args = ["attribution", "explain", "--checkpoint", ckpt, "--method", "readout", "--images",
            "1", "--out", str(tmp_path / "e"), *QUIET, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "e").exists()  # refused before the run directory is written


def test_readout_for_another_class_count_is_refused(trained, random_checkpoint) -> None:
    from narrows.attribution.readout import load_readout
    from narrows.errors import UserError

    other = _net(random_checkpoint(TINY.replace("classes=2", "classes=3")))
    with pytest.raises(UserError, match=r"'logits' gives \(3,\), the readout expects \(2,\)"):
        load_readout(trained[0] / "readout.pt", other, check_weights=False)


def test_readout_training_logs_each_step_to_tensorboard(checkpoint, tmp_path):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "logged"
    assert main([*_train_args(checkpoint, out), "--log", "tensorboard"]) == 0
    events = accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(8))  # 32 images / 8 per batch × 2 epochs
    history = json.loads((out / "results.json").read_text())
    assert history["summary"].startswith("done: loss")
    (last,) = [e.value for e in events.Scalars("epoch/loss")][-1:]
    assert last == pytest.approx(history["final"]["loss"], rel=1e-6)

