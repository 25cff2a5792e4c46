"""Run directories and atomic writes."""

from __future__ import annotations

import pytest

from narrows.errors import UserError
from narrows.runs import RunDir, atomic_write, atomic_write_json, default_out


def test_atomic_write_keeps_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"a": 1})

    def broken(fh):
        fh.write(b'{"half": ')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text().strip().startswith('{\n  "a": 1')
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "r.json", {})
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_reopen_same_options_resumes_and_different_options_refuse(tmp_path):
    out = tmp_path / "run"
    run = RunDir.open(out, "train", {"lr": 0.1, "device": "cpu"}, {"lr": 0.1})
    run.write_json("results.json", {"x": 1})
    again = RunDir.open(out, "train", {"lr": 0.1, "device": "cuda"}, {"lr": 0.1})
    assert again.read_json("results.json") == {"x": 1}
    with pytest.raises(UserError, match=r"different options \(lr: 0.1 → 0.2\)"):
        RunDir.open(out, "train", {"lr": 0.2}, {"lr": 0.2})
    with pytest.raises(UserError, match="holds a 'train' run"):
        RunDir.open(out, "evaluate", {"lr": 0.1}, {"lr": 0.1})
    fresh = RunDir.open(out, "train", {"lr": 0.2}, {"lr": 0.2}, overwrite=True)
    assert not fresh.exists("results.json")
    assert fresh.read_config()["result_options"] == {"lr": 0.2}


def test_foreign_directory_is_never_overwritten(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a narrows run directory"):
            RunDir.open(tmp_path, "train", {}, {}, overwrite=overwrite)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_metrics_round_trip(tmp_path):
    run = RunDir.open(tmp_path / "r", "train", {}, {})
    rows = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    run.write_metrics(rows)
    assert run.read_metrics() == rows


def test_default_out_is_a_safe_path():
    assert str(default_out("train", "resnet20_cifar", "cifar10:/data/x")) == \
        "runs/train/resnet20_cifar-cifar10_data_x"


def test_resuming_removes_temporaries_a_killed_write_left(tmp_path):
    """A kill during an atomic write leaves ``.<name>.<random>.tmp``; the next run removes it."""
    from narrows.runs import RunDir

    run = RunDir.open(tmp_path / "r", "cmd", {"a": 1}, {"a": 1})
    run.write_text("result.txt", "done")
    (run.path / "figs").mkdir()
    stale = [run.path / ".curves.png.abc123.tmp", run.path / "figs" / ".x.png.q.tmp"]
    for path in stale:
        path.write_bytes(b"")
    RunDir.open(tmp_path / "r", "cmd", {"a": 1}, {"a": 1})
    assert not any(path.exists() for path in stale)
    assert (run.path / "result.txt").read_text() == "done"
