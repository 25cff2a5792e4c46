"""A diverged training stops with one line and writes no NaN checkpoint; NaN weights are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from narrows.cli import main
from narrows.errors import UserError

TINY = "shapes:classes=2,size=16,train=32,test=16"


def _all_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and " — " in err
    return err


def test_train_with_a_huge_rate_stops_and_saves_no_nan_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", TINY, "--model", "resnet20_cifar", "--epochs", "1",
            "--batch-size", "4", "--lr", "1e6", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = _one_error_line(capsys)
    assert "training diverged" in err and "epoch 1/1" in err and "lower --lr" in err
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    assert all(_all_finite(p) for p in out.glob("*.pt"))  # init.pt only


@pytest.mark.parametrize("option", [["--lr", "inf"], ["--weight-decay", "inf"]])
def test_infinite_rates_are_refused_before_training(tmp_path, capsys, option):
    out = tmp_path / "run"
    args = ["train", "--data", TINY, "--model", "resnet20_cifar", "--epochs", "1",
            "--batch-size", "4", *option, "--out", str(out), "--no-progress"]
    assert main(args) == 2
    assert "inf is not finite" in _one_error_line(capsys)
    assert not out.exists()


def test_a_nan_loss_keeps_the_last_good_checkpoint(tmp_path):
    """Any loss_fn (order losses, CSG) is watched: NaN in epoch 2 keeps epoch 1's files."""
    from tiny import random_subject

    from narrows.data import load
    from narrows.runs import RunDir
    from narrows.training import TrainSettings, fit
    from narrows.training.loop import Diverged

    data = load(TINY)
    net, card = random_subject(TINY)
    calls = []

    def loss_fn(model, inputs, labels):
        calls.append(1)
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
        return (loss * float("nan") if len(calls) == 3 else loss), logits

    settings = TrainSettings(epochs=2, lr=0.01, batch_size=16, augment="none", workers=0)
    run = RunDir(tmp_path / "run")
    with pytest.raises(Diverged) as caught:
        fit(net, data, settings, card=card, device=torch.device("cpu"), run=run,
            loss_fn=loss_fn, progress=False, log=lambda _: None)
    assert "epoch 2/2, step 1/2" in str(caught.value)
    assert "last.pt (epoch 1), is kept" in str(caught.value)
    last = torch.load(run.file("last.pt"), map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and _all_finite(run.file("last.pt"))
    assert _all_finite(run.file("best.pt"))


def test_a_checkpoint_with_a_nan_weight_is_refused(tmp_path, capsys, random_checkpoint):
    from narrows.models import load_model

    state = torch.load(random_checkpoint(TINY), map_location="cpu", weights_only=False)
    state["state_dict"]["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    with pytest.raises(UserError, match=r"NaN weights \(first in 'layer2.0.conv1.weight'\)"):
        load_model(bad)
    assert main(["evaluate", "--checkpoint", str(bad), "--out", str(tmp_path / "ev")]) == 2
    err = _one_error_line(capsys)
    assert str(bad) in err and "layer2.0.conv1.weight" in err
