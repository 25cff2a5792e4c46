"""Interactions and run directories off the demo path (issue 10, items 4, 5 and 7, figures)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from narrows.cli import main
from narrows.errors import UserError
from narrows.interactions.result import InteractionResult, plot_curves
from narrows.interactions.runner import (
    InteractionSettings,
    Plan,
    constant_output_cause,
    multi_order,
)
from narrows.runs import RunDir, atomic_write_json

DATA = "shapes:classes=2,size=16,train=24,test=8"
SMOKE = ["--preset", "smoke", "--contexts", "3", "--batch-size", "32", "--no-progress",
         "--threads", "1"]


class ZeroScaledNet(nn.Module):
    """A block whose last BatchNorm starts at scale 0 (as timm initialises residual blocks),
    without the shortcut: its output does not depend on the input at all."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        nn.init.zeros_(self.bn.weight)
        self.head = nn.Linear(4, classes)
        self.num_classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class FirstClassNet(nn.Module):
    """A small non-linear model that predicts class 0 for every image (so --only-correct keeps
    the images of class 0 only) and whose interactions are not 0."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(3 * 16 * 16, 8)
        self.out = nn.Linear(8, classes)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor([20.0] + [0.0] * (classes - 1)))
        self.num_classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(3 * self.hidden(x.flatten(1))))


def _fake_subject(net: nn.Module):
    """A ``load_subject`` stand-in serving ``net`` at initialisation on the shapes data."""
    from narrows.data import load
    from narrows.models.subject import Subject

    def fake(checkpoint, model, data, image_size=None, *args, **kwargs):
        bundle = load(DATA)
        return Subject(net, bundle, tuple(bundle.info.mean), tuple(bundle.info.std),
                       "tiny (init)", "tiny-init")

    return fake


def _images(n: int = 2):
    from narrows.data import load

    bundle = load(DATA)
    test = bundle.test()
    images = torch.stack([test[i][0] for i in range(n)])
    return bundle, images, [int(test[i][1]) for i in range(n)]


SETTINGS = InteractionSettings(grid=4, pairs=3, contexts=2, ratios=(0.0, 0.5, 1.0))


# -- item 4: a degenerate reward is detected, said once, and never drawn ---------------------

def test_constant_output_is_degenerate_with_its_cause_and_writes_no_nan(tmp_path):
    bundle, images, labels = _images()
    result = multi_order(ZeroScaledNet(), images, labels, mean=bundle.info.mean,
                         std=bundle.info.std, settings=SETTINGS)
    assert not result.dv.any()
    assert "every Δv is 0" in result.degenerate()
    assert "BatchNorm" in result.warning()
    cause = constant_output_cause(ZeroScaledNet(), at_init=True)
    assert "initialisation" in cause and "zero-initialised" in cause and "train it" in cause
    result.save(tmp_path / "r")
    csv_text = (tmp_path / "r" / "curve.csv").read_text()
    assert "nan" not in csv_text.lower()
    row = csv_text.splitlines()[1].split(",")
    assert row[4] == ""  # J_sampled is empty, not NaN
    meta = json.loads((tmp_path / "r" / "meta.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in meta.json"))
    assert "every Δv is 0" in meta["warning"]
    back = InteractionResult.load(tmp_path / "r")
    assert back.warning() == result.warning()


def test_a_degenerate_curve_stays_out_of_the_legend():
    bundle, images, labels = _images()
    good = multi_order(FirstClassNet(), images, labels, mean=bundle.info.mean,
                       std=bundle.info.std, settings=SETTINGS)
    bad = multi_order(ZeroScaledNet(), images, labels, mean=bundle.info.mean,
                      std=bundle.info.std, settings=SETTINGS)
    assert good.degenerate() is None
    fig, ax = plot_curves([good, bad], ["trained", "init"])
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "trained" in names and "init" not in names
    assert len(ax.get_lines()) == 1
    notes = " ".join(t.get_text() for t in ax.texts)
    assert "init: no curve" in notes
    fig2, ax2 = plot_curves([bad])  # nothing to draw: a note, no legend, no line
    assert not ax2.get_lines() and ax2.get_legend() is None and ax2.texts


def test_cli_says_once_that_the_output_ignores_the_patches(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("narrows.models.subject.load_subject", _fake_subject(ZeroScaledNet()))
    out = tmp_path / "run"
    assert main(["interactions", "run", "--model", "tiny", "--data", DATA, "--out", str(out),
                 "--no-only-correct", *SMOKE]) == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, printed
    assert "initialisation" in warnings[0] and "BatchNorm" in warnings[0]
    assert "J (sampled)" not in printed
    assert "nan" not in (out / "curve.csv").read_text().lower()
    assert (out / "curve.png").is_file()


# -- item 5: --only-correct says how many images it kept; one image has no standard error ----

def test_plan_says_how_many_images_were_kept_and_why():
    plan = Plan([4], [0], 10, 12, candidates=10, misclassified=9)
    line = plan.describe(True, ["circle", "square"])
    assert "1 image of 10 candidates" in line and "9 misclassified" in line
    assert "circle 1" in line
    note = plan.shrunk(True, at_init=True)
    assert "only 1 of 10" in note and "initialisation" in note and "--no-only-correct" in note
    assert "no standard error" in note
    assert Plan([1, 2, 3], [0, 1, 0], 1, 1, 4, 1).shrunk(True) is None  # most were kept
    assert Plan([1], [0], 1, 1, 4, 3).shrunk(True) is not None  # fewer than half
    assert plan.shrunk(False, at_init=True) is None


def test_one_image_gives_no_standard_error_rather_than_nan(tmp_path):
    bundle, images, labels = _images(1)
    result = multi_order(FirstClassNet(), images, labels, mean=bundle.info.mean,
                         std=bundle.info.std, settings=SETTINGS)
    assert result.stderr("J") is None and result.stderr("A") is None
    rows = result.curve_rows()
    assert all(r["J_sampled_stderr"] is None and r["A_stderr"] is None for r in rows)
    result.save(tmp_path / "one")
    assert "nan" not in (tmp_path / "one" / "curve.csv").read_text().lower()
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert meta["standard_errors"] == "none: 1 image"
    fig, ax = result.plot()
    assert not ax.collections  # no band
    assert ax.get_legend() is None  # one curve, no band: nothing to explain
    assert "1 image × 3 pairs" in ax.get_title()


def test_cli_reports_the_shrunken_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("narrows.models.subject.load_subject", _fake_subject(FirstClassNet()))
    out = tmp_path / "run"
    assert main(["interactions", "run", "--model", "tiny", "--data", DATA, "--out", str(out),
                 "--images", "2", *SMOKE]) == 0
    printed = capsys.readouterr().out
    assert "images: 1 image of 2 candidates (1 misclassified, left out by --only-correct)" \
        in printed
    assert "note: only 1 of 2" in printed and "initialisation" in printed
    assert "nan" not in (out / "curve.csv").read_text().lower()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["misclassified_left_out"] == 1 and meta["candidates"] == 2
    assert meta["standard_errors"] == "none: 1 image"


# -- figures: bands explained, model and sample in the title ---------------------------------

def test_figure_explains_the_band_and_names_model_and_sample():
    bundle, images, labels = _images(3)
    result = multi_order(FirstClassNet(), images, labels, mean=bundle.info.mean,
                         std=bundle.info.std, settings=SETTINGS)
    result.meta["model"] = "tiny (init)"
    fig, ax = result.plot()
    title = ax.get_title()
    assert "tiny (init)" in title and "3 images × 3 pairs × 2 contexts" in title
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "±1 s.e. (jackknife over 3 images)" in legend
    assert not any("ours" in t.lower() for t in legend)


# -- item 7: a refused command writes nothing; the corrected one takes the directory ---------

def test_refused_interactions_run_leaves_out_free(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["interactions", "run", "--model", "resnet20_cifar", "--data", DATA, "--out",
            str(out), "--images", "2", "--no-only-correct", *SMOKE]
    assert main([*base, "--grid", "5"]) == 2  # 5 does not divide 16
    assert "does not divide" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--grid", "4"]) == 0
    assert (out / "curve.csv").is_file()


def test_refused_train_leaves_out_free(tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["train", "--data", DATA, "--epochs", "1", "--resume", "--out", str(out),
                 "--no-progress", "--threads", "1"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert not out.exists()


def test_run_directory_is_created_by_its_first_write(tmp_path):
    out = tmp_path / "r"
    run = RunDir.open(out, "train", {"lr": 0.1}, {"lr": 0.1})
    assert not out.exists() and run.read_config()["result_options"] == {"lr": 0.1}
    del run  # refused before writing: nothing to take back
    RunDir.open(out, "train", {"lr": 0.2}, {"lr": 0.2})  # other options: still free
    run = RunDir.open(out, "train", {"lr": 0.3}, {"lr": 0.3})
    atomic_write_json(run.file("sub") / "x.json", {})  # any write inside claims it
    assert RunDir(out).read_config()["result_options"] == {"lr": 0.3}
    with pytest.raises(UserError, match="different options"):
        RunDir.open(out, "train", {"lr": 0.4}, {"lr": 0.4})


def test_a_directory_with_only_a_config_is_taken_over(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("command: interactions run\nresult_options:\n  grid: 6\n")
    run = RunDir.open(out, "interactions run", {"grid": 8}, {"grid": 8})
    run.write_json("meta.json", {})
    assert RunDir(out).read_config()["result_options"] == {"grid": 8}
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)  # empty folders only: not a foreign directory
    RunDir.open(empty, "train", {}, {}).write_json("a.json", {})
    assert (empty / "config.yaml").is_file()


def test_nested_runs_write_both_configs(tmp_path):
    outer = RunDir.open(tmp_path / "cmp", "interactions compare", {}, {"a": 1})
    inner = RunDir.open(outer.path / "m", "interactions run", {}, {"b": 2})
    atomic_write_json(inner.file("meta.json"), {})
    assert RunDir(outer.path).read_config()["command"] == "interactions compare"
    assert RunDir(inner.path).read_config()["command"] == "interactions run"


def test_overwrite_still_replaces_at_once(tmp_path):
    out = tmp_path / "r"
    RunDir.open(out, "train", {}, {"lr": 0.1}).write_json("results.json", {})
    fresh = RunDir.open(out, "train", {}, {"lr": 0.2}, overwrite=True)
    assert not fresh.exists("results.json")
    assert RunDir(out).read_config()["result_options"] == {"lr": 0.2}
