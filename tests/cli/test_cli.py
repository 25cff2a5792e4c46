"""The command line: error paths (one line, exit 2, no traceback), configs, train → evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from narrows.cli import main

TINY = "shapes:classes=2,size=16,train=48,test=24"


def narrows(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "narrows", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--data", "cifar10:/nonexistent"], "cifar-10-batches-py"),
        (["train", "--model", "resnet20_cifra"], "did you mean resnet20_cifar"),
        (["train", "--epochs", "0"], "--epochs 0 is not > 0"),
        (["train", "--lr", "fast"], "bad value 'fast' for --lr"),
        (["train", "--bogus"], "narrows train --help"),
        (["train", "--data", "mnist"], "unknown data spec 'mnist'"),
        (["evaluate", "--checkpoint", "/nonexistent.pt"], "/nonexistent.pt"),
        (["train", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
        (["train", "--device", "cuda:x"], "device"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(capsys, args, expected):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and " — " in err
    assert expected in err


def test_real_process_error_has_no_traceback():
    proc = narrows("train", "--data", "cifar10:/nonexistent")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "expected /nonexistent/cifar-10-batches-py" in lines[0]


def test_help_and_import_stay_light():
    code = (
        "import sys, narrows; assert 'torch' not in sys.modules\n"
        "import contextlib, io\n"
        "from narrows.cli import main\n"
        "from narrows.cli.app import COMMANDS, _load_commands\n"
        "_load_commands()\n"
        "assert len(COMMANDS) > 10\n"
        "for command in COMMANDS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n            main([*command.words, '--help'])\n"
        "        except SystemExit:\n            pass\n"
        "heavy = [m for m in ('matplotlib', 'captum', 'torch', 'timm', 'sklearn') if m in sys.modules]\n"
        "print(heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_config_file_then_flags_then_resume_and_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"data: '{TINY}'\nepochs: 1\nlr: 0.5\nbatch-size: 16\n")
    args = ["train", "--config", str(cfg), "--lr", "0.05", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    saved = (out / "config.yaml").read_text()
    assert "lr: 0.05" in saved and "epochs: 1" in saved and "batch_size: 16" in saved
    results = json.loads((out / "results.json").read_text())

    # same options → resumes (nothing to do); other options → refused; --overwrite → fresh
    assert main(args) == 0
    assert main(args[:-1] + ["--lr", "0.07", "--no-progress"]) == 2
    assert "different options (lr: 0.05 → 0.07)" in capsys.readouterr().err

    # evaluate needs only the checkpoint: its card names the data and normalisation
    ev = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--out", str(ev),
                 "--no-progress"]) == 0
    evaluated = json.loads((ev / "results.json").read_text())
    assert evaluated["top1"] == pytest.approx(results["best_top1"])
    assert evaluated["n"] == 24

    # fine-tuning from a narrows checkpoint needs no --model: the card names the architecture
    ft = tmp_path / "ft"
    assert main(["train", "--checkpoint", str(out / "best.pt"), "--data", TINY, "--epochs", "1",
                 "--out", str(ft), "--no-progress"]) == 0
    assert json.loads((ft / "results.json").read_text())["model"] == "resnet20_cifar"
    assert main(["train", "--checkpoint", str(out / "best.pt"), "--model", "resnet32_cifar",
                 "--data", TINY, "--out", str(tmp_path / "x")]) == 2
    assert "was saved with --model resnet20_cifar" in capsys.readouterr().err


def test_wrong_head_size_lists_the_mismatched_keys(tmp_path, capsys):
    from narrows.models import create

    foreign = tmp_path / "foreign.pth"
    model = create("resnet20_cifar", num_classes=100)
    torch.save({"best_prec1": 50.0, "state_dict": {f"module.{k}": v for k, v in
                                                   model.state_dict().items()}}, foreign)
    code = main(["evaluate", "--checkpoint", str(foreign), "--model", "resnet20_cifar",
                 "--num-classes", "10", "--data", "digits", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2
    assert "linear.weight" in err and "100×64" in err and "10×64" in err
    assert not (tmp_path / "e" / "results.json").exists()


def test_models_lists_narrows_models_first(capsys):
    assert main(["models", "*cifar*"]) == 0
    names = capsys.readouterr().out.split()
    assert names[:5] == ["resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar",
                         "resnet110_cifar"] and "alexnet_cifar" in names


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    """DDP with gloo: trains, only rank 0 writes, and sharded evaluation counts every image once."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "narrows", "train", "--data", TINY, "--epochs", "1",
           "--batch-size", "8", "--out", str(out), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: test top-1") == 1  # rank 0 reports, rank 1 stays quiet
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["n"] == 24
    # the distributed evaluation equals a single-process one on the same weights
    ev = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--out", str(ev),
                 "--no-progress"]) == 0
    single = json.loads((ev / "results.json").read_text())
    assert single["top1"] == pytest.approx(results["final"]["top1"])
    assert single["loss"] == pytest.approx(results["final"]["loss"], rel=1e-5)
    assert sorted(p.name for p in Path(out).iterdir() if not p.name.startswith(".")) == [
        "best.pt", "config.yaml", "curves.png", "init.pt", "last.pt", "metrics.jsonl",
        "results.json"]


@pytest.mark.slow
def test_sigkill_after_epoch_2_then_resume_equals_uninterrupted(tmp_path):
    """The acceptance check: `narrows train --epochs 4`, killed -9 after epoch 2, resumed."""
    import signal
    import time

    data = "shapes:classes=3,size=16,train=160,test=32"
    base = ["train", "--data", data, "--epochs", "4", "--batch-size", "16", "--no-progress",
            "--threads", "2"]
    assert main([*base, "--out", str(tmp_path / "full")]) == 0  # the reference, in this process

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "narrows", *base, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 4

    resumed = narrows(*base, "--out", str(out))
    assert resumed.returncode == 0 and "resuming" in resumed.stdout
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    again = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    assert full.keys() == again.keys()
    assert all(torch.equal(full[k], again[k]) for k in full)
