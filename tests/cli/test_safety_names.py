"""Names that become paths (compare labels, sweep names, sweep run names) stay inside --out:
a hostile one is refused with one line and exit 2, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from narrows.cli import main
from narrows.errors import UserError
from narrows.runs.run import default_out, safe_name


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and " — " in err[0], err
    return err[0]


@pytest.mark.parametrize("name", ["..", ".", "...", "a/b", "../../escaped", "/abs/x", "\\x",
                                  "a\\b", "", "  ", "a\0b"])
def test_safe_name_refuses_names_that_are_not_one_plain_name(name):
    with pytest.raises(UserError, match="cannot name a directory"):
        safe_name(name, "model label")


@pytest.mark.parametrize("name", ["trained", "init.v2", "a..b", "lr=0.1", "C:x", "~home", "x y"])
def test_safe_name_keeps_plain_names_unchanged(name):
    assert safe_name(name, "model label") == name


def test_default_out_never_names_a_dot_directory():
    assert default_out("kvb-sweep", "..") == Path("runs/kvb-sweep/_")
    assert default_out("kvb-sweep", "../../x") == Path("runs/kvb-sweep/__.._x")
    assert ".." not in default_out("evaluate", ".", ".").parts


@pytest.mark.parametrize("label", ["../../escaped", "/tmp/narrows-escaped-label", "sub/dir", ".."])
def test_compare_refuses_a_label_that_is_a_path(tmp_path, capsys, random_checkpoint, label):
    checkpoint = random_checkpoint("digits")
    root = tmp_path / "root"
    out = root / "c" / "inner"
    root.mkdir()
    code = main(["interactions", "compare", "--models", f"{label}={checkpoint}",
                 "--preset", "smoke", "--out", str(out)])
    assert code == 2
    line = _one_error_line(capsys)
    assert "model label" in line
    assert _files(root) == [] and not out.exists()  # nothing inside or outside --out
    assert not Path("/tmp/narrows-escaped-label").exists()


def test_compare_checks_every_label_before_loading_any_model(tmp_path, capsys, random_checkpoint):
    checkpoint = random_checkpoint("digits")
    out = tmp_path / "cmp"
    code = main(["interactions", "compare", "--models", f"good={checkpoint}",
                 f"../bad={checkpoint}", "--preset", "smoke", "--out", str(out)])
    assert code == 2 and "'../bad'" in _one_error_line(capsys)
    assert _files(tmp_path) == []


def _sweep(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text("command: kvb toy\n"
                    "options: {seeds: [0], models: [mlp], resolution: 8, test_points: 50}\n"
                    + body)
    return path


@pytest.mark.parametrize("name", ["..", "../../escaped", "/tmp/narrows-escaped-sweep"])
def test_sweep_refuses_a_name_that_is_a_path(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # the sweep's default --out is runs/kvb-sweep/NAME
    path = _sweep(tmp_path, f"name: '{name}'\ngrid:\n  steps: [5]\n")
    assert main(["kvb", "sweep", str(path)]) == 2
    assert "sweep name" in _one_error_line(capsys)
    assert _files(tmp_path) == [path]
    assert not Path("/tmp/narrows-escaped-sweep").exists()


def test_sweep_run_names_stay_inside_out(tmp_path):
    from narrows.runs.sweep import run_name

    for value in ["..", "../../x", "/abs", "a\\b", ["..", "/"]]:
        name = run_name({"steps": value})
        assert safe_name(name, "run name") == name
        out = tmp_path / "out"
        assert (out / "runs" / name).resolve().parent == (out / "runs").resolve()
