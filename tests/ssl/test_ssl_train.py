"""Pretraining end to end: the run's files, exact resume, torchrun, the CLI and the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from narrows.cli import main
from narrows.runs import RunDir
from narrows.ssl.options import PRESETS, PretrainData, SSLOptions
from narrows.ssl.result import PretrainResult

TINY = "shapes:classes=2,size=32,train=32,test=16"
QUIET = ["--device", "cpu", "--threads", "1", "--no-progress"]
TIMING = ("seconds", "images_per_second")


def _options(**changes) -> SSLOptions:
    return SSLOptions.from_preset("smoke", **{"knn": False, **changes})


def _same_checkpoints(a: Path, b: Path) -> None:
    left = torch.load(a, weights_only=True)
    right = torch.load(b, weights_only=True)
    for key in ("student", "teacher", "loss"):
        assert left[key].keys() == right[key].keys()
        for name in left[key]:
            assert torch.equal(left[key][name], right[key][name]), (key, name)
    for group_a, group_b in zip(left["optimizer"]["state"].values(),
                                right["optimizer"]["state"].values(), strict=True):
        for name in group_a:
            assert torch.equal(torch.as_tensor(group_a[name]), torch.as_tensor(group_b[name]))
    strip = [{k: v for k, v in row.items() if k not in TIMING} for row in left["metrics"]]
    assert strip == [{k: v for k, v in row.items() if k not in TIMING}
                     for row in right["metrics"]]


def test_presets_are_the_names_the_cli_offers():
    from typing import get_args

    from narrows.ssl.options import PresetName

    assert set(PRESETS) == set(get_args(PresetName))
    assert "preset" in PretrainData.__dataclass_fields__
    for name, changes in PRESETS.items():
        SSLOptions.from_preset(name)  # every preset names real fields
        assert set(changes) <= set(SSLOptions.__dataclass_fields__), name


def test_killed_run_resumes_bit_identical(tmp_path, monkeypatch):
    """Interrupted in its second epoch and re-run, a run ends with the same weights, optimizer,
    centres and losses as an uninterrupted one, without redoing the finished epoch."""
    from narrows.ssl import trainer

    whole = tmp_path / "whole"
    trainer.pretrain(_options(epochs=3), TINY, run=RunDir(whole), progress=False,
                     say=lambda *a: None)
    real, calls, die_at = trainer.train_step, [], [6]  # step 2 of epoch 2 (4 steps an epoch)

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == die_at[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", counted)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        trainer.pretrain(_options(epochs=3), TINY, run=RunDir(broken), progress=False,
                         say=lambda *a: None)
    calls.clear()
    die_at[0] = -1
    trainer.pretrain(_options(epochs=3), TINY, run=RunDir(broken), progress=False,
                     say=lambda *a: None)
    assert len(calls) == 8  # epochs 2 and 3 only
    _same_checkpoints(whole / "checkpoint.pt", broken / "checkpoint.pt")
    result = PretrainResult.load(broken / "pretraining.json")
    assert [row["epoch"] for row in result.metrics] == [1, 2, 3]


def test_cli_train_then_export_loads_strictly_in_timm_and_narrows(tmp_path, capsys):
    import timm

    from narrows.models import load_model

    out = tmp_path / "run"
    assert main(["ssl", "train", "--preset", "smoke", "--data", TINY, "--epochs", "1",
                 "--out", str(out), *QUIET]) == 0
    text = capsys.readouterr().out
    assert "teacher kNN top-1 at initialisation" in text and "UDI" in text
    assert {"checkpoint.pt", "metrics.jsonl", "loss.png", "pretraining.json"} <= {
        p.name for p in out.iterdir()}
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"g_cl", "g_mcl", "g_pch", "l_cl", "l_mcl", "lr", "wd", "momentum",
            "teacher_temp", "images_per_second"} <= set(row)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    for tokens, expect in (("keep", 2), ("drop", 1)):
        file = tmp_path / f"{tokens}.safetensors"
        assert main(["ssl", "export", "--checkpoint", str(out / "checkpoint.pt"),
                     "--class-tokens", tokens, "--output", str(file)]) == 0
        said = capsys.readouterr().out
        assert ("both class tokens kept" if tokens == "keep" else "cls+ dropped") in said
        loaded = load_model(str(file))  # the card rebuilds it; strict
        assert loaded.model.num_prefix_tokens == expect
        kwargs = dict(loaded.card.model_kwargs)
        assert kwargs.get("reg_tokens", 0) == expect - 1 and kwargs["patch_size"] == 8
        vit = timm.create_model("vit_tiny_patch16_224", checkpoint_path=str(file), num_classes=0,
                                **kwargs)
        assert vit.num_prefix_tokens == expect
        assert torch.equal(vit.cls_token, saved["teacher"]["backbone.cls_token"])
    assert main(["ssl", "export", "--checkpoint", str(out / "checkpoint.pt"),
                 "--output", str(tmp_path / "keep.safetensors")]) == 2  # exists


@pytest.mark.parametrize("argv, says", [
    (["--img-size", "32", "--local-size", "64"], "--local-size 64 is larger than --img-size"),
    (["--data", "shapes:classes=2,size=32,train=4,test=4"], "fewer than one batch"),
    (["--method", "dino", "--local-patch"], "--local-patch needs"),
    (["--img-size", "30"], "multiple of patch_size"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, says):
    out = tmp_path / "bad"
    code = main(["ssl", "train", "--preset", "smoke", "--data", TINY, "--out", str(out),
                 *QUIET, *argv])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1, err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    """gloo, 2 processes × 4 images = 1 process × 8 images: the same losses and centres."""
    args = ["ssl", "train", "--preset", "smoke", "--data", TINY, "--epochs", "2", "--no-knn",
            *QUIET]
    assert main([*args, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "narrows", *args, "--batch-size", "4",
                           "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch   2/2") == 1  # rank 0 reports, rank 1 stays quiet
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    for a, b in zip(one["metrics"], two["metrics"], strict=True):
        for name in ("loss", "g_cl", "g_mcl", "g_pch", "l_cl", "l_mcl"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-5), name
    assert torch.allclose(one["loss"]["center"], two["loss"]["center"], atol=1e-5)
    for name, value in one["teacher"].items():
        assert torch.allclose(value, two["teacher"][name], atol=1e-4), name


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    from narrows.errors import UserError
    from narrows.ssl import loss as loss_module
    from narrows.ssl import trainer

    real, calls = loss_module.UDILoss.forward, []

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:  # in epoch 2 (4 steps an epoch)
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(loss_module.UDILoss, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="diverged.*epoch 2/3"):
        trainer.pretrain(_options(epochs=3), TINY, run=RunDir(out), progress=False,
                         say=lambda *a: None)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["student"].values())
