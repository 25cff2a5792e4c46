"""Every command with ``--out`` refuses a place it cannot write with one line, exit 2, nothing
created (issue 11, item 6). The commands come from the registry, so a new one is covered."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from narrows.cli import app, main
from narrows.cli.preflight import check

app._load_commands()
OUT_COMMANDS = [c for c in app.COMMANDS if "out" in {f.name for f in dataclasses.fields(c.config)}]


def _is_file_out(command: app.Command) -> bool:
    return bool(_file_name(command))


def _file_name(command: app.Command) -> str:
    """A good file name for a FILE ``--out`` (FILE: a figure; FILE.html: that suffix), else ''."""
    field = next(f for f in dataclasses.fields(command.config) if f.name == "out")
    metavar = field.metadata.get("metavar") or ""
    if not metavar.startswith("FILE"):
        return ""
    return "out." + (metavar.partition(".")[2] or "png")


DIR_COMMANDS = [c for c in OUT_COMMANDS if not _is_file_out(c)]
FILE_COMMANDS = [c for c in OUT_COMMANDS if _is_file_out(c)]


def _id(command: app.Command) -> str:
    return "-".join(command.words)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Values for the inputs a command may need: a checkpoint, a data spec, files. The
    checkpoint is a placeholder: the output place is checked before any input is read."""
    where = tmp_path_factory.mktemp("out-inputs")
    checkpoint = str(where / "model.pt")
    Path(checkpoint).write_bytes(b"never read: --out is refused first")
    (where / "indices.json").write_text('{"0": [0]}')
    (where / "sweep.yaml").write_text("command: kvb toy\ngrid: {}\n")
    (where / "run").mkdir()
    return {"checkpoint": checkpoint, "csg_checkpoint": checkpoint, "data": "digits",
            "indices": str(where / "indices.json"), "models": checkpoint,
            "runs": str(where / "run"), "file": str(where / "sweep.yaml")}


def _argv(command: app.Command, inputs: dict[str, str], out: str) -> list[str]:
    """The command's words, a valid value for each input it takes (by field name), ``--out``."""
    hints = typing.get_type_hints(command.config)
    argv = list(command.words)
    for f in dataclasses.fields(command.config):
        if f.name not in inputs:
            continue
        lists = [t for t in (hints[f.name], *typing.get_args(hints[f.name]))
                 if typing.get_origin(t) is list]
        if lists and typing.get_args(lists[0]) != (str,):
            continue  # a list of numbers (e.g. image indices): not an input file
        if f.metadata.get("positional"):
            argv.append(inputs[f.name])
        else:
            argv += ["--" + f.name.replace("_", "-"), inputs[f.name]]
    return argv + ["--out", out]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def immutable(tmp_path):
    """A directory nobody, root included, can create entries in (``chattr +i``)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(locked)],
                                        capture_output=True).returncode != 0:
        pytest.skip("cannot make an immutable directory here (no chattr or no permission)")
    yield locked
    subprocess.run([chattr, "-i", str(locked)], check=True)


@pytest.fixture()
def read_only(tmp_path):
    """A read-only directory (no refusal for root, who may write there anyway)."""
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory; the immutable case covers root")
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    yield locked
    locked.chmod(0o755)


def _place(case: str, tmp_path: Path, request, figure: str) -> str:
    name = figure or "run"
    (tmp_path / "afile").write_text("x")
    if case == "existing-file":
        return str(tmp_path / "afile")
    if case == "existing-dir":
        (tmp_path / "adir").mkdir()
        return str(tmp_path / "adir")
    if case == "unknown-format":
        return str(tmp_path / "fig.xyz")
    if case == "under-file":
        return str(tmp_path / "afile" / name)
    if case == "proc":
        return f"/proc/narrows-x/{name}" if figure else "/proc/narrows-x"
    if case in ("immutable", "read-only"):
        return str(request.getfixturevalue(case.replace("-", "_")) / name)
    raise AssertionError(case)


def _refused_cleanly(argv: list[str], tmp_path: Path, out: str, capsys) -> None:
    before = _tree(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert lines[0].startswith(f"error: --out {out}") and " — " in lines[0], err
    assert "Traceback" not in err
    assert _tree(tmp_path) == before, "something was created"
    assert not Path("/proc/narrows-x").exists()


DIR_CASES = ["existing-file", "under-file", "proc", "immutable", "read-only"]
FILE_CASES = ["existing-dir", "unknown-format", "under-file", "proc", "immutable", "read-only"]
PLACES = ([(command, case, "") for case in DIR_CASES for command in DIR_COMMANDS]
          + [(command, case, _file_name(command)) for case in FILE_CASES
             for command in FILE_COMMANDS])


@pytest.mark.parametrize(("command", "case", "figure"), PLACES,
                         ids=[f"{_id(c)}-{case}" for c, case, _ in PLACES])
def test_bad_output_place_is_one_line(command, case, figure, inputs, tmp_path, monkeypatch,
                                      request, capsys):
    """A directory ``--out`` (or a file ``--out`` for FILE_COMMANDS: a figure, a report) in a
    bad place."""
    monkeypatch.chdir(tmp_path)
    out = _place(case, tmp_path, request, figure=figure)
    _refused_cleanly(_argv(command, inputs, out), tmp_path, out, capsys)


@pytest.mark.parametrize("command", OUT_COMMANDS, ids=_id)
def test_the_same_command_line_passes_with_a_good_place(command, inputs, tmp_path):
    """Control: with a writable ``--out`` the command line passes every preflight check, so the
    refusals above are about ``--out`` alone."""
    out = str(tmp_path / (_file_name(command) or "run"))
    parsed, cfg = app.parse(_argv(command, inputs, out))
    assert parsed is command
    check(cfg)
    assert _tree(tmp_path) == set()


def test_every_command_with_out_is_covered():
    """The table is the registry: the commands the issue names are all in it."""
    named = {("train",), ("evaluate",), ("quickstart",), ("interactions", "run"),
             ("interactions", "plot"), ("attribution", "stats"), ("attribution", "explain"),
             ("attribution", "evaluate"), ("attribution", "sanity"), ("decompose", "extract"),
             ("kvb", "embed"), ("kvb", "train"), ("kvb", "toy"), ("kvb", "sweep"), ("report",)}
    assert named <= {c.words for c in OUT_COMMANDS}
