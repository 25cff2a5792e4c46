"""Mistakes refused before torch is imported: paths, data specs and the output place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from narrows.cli import main


def test_refusals_happen_before_torch_is_imported(tmp_path):
    """A wrong path is answered at once: torch (seconds to import) is never loaded."""
    code = (
        "import sys, contextlib, io\n"
        "from narrows.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    assert main(['evaluate', '--checkpoint', {str(tmp_path / 'no.pt')!r}]) == 2\n"
        f"    assert main(['train', '--data', 'folder:{tmp_path / 'nothere'}']) == 2\n"
        f"    assert main(['evaluate', '--checkpoint', 'x.pt', '--out', '/proc/x']) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(err.getvalue())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)


@pytest.fixture()
def checkpoint(tmp_path) -> str:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not read: the output check comes first")
    return str(path)


@pytest.mark.parametrize(("out", "expected"), [
    ("afile", "is a file"),
    ("afile/below", "is a file, not a directory"),
    ("/proc/narrows-test", "cannot write under /proc"),
])
def test_output_directory_problems_are_one_line(tmp_path, checkpoint, capsys, out, expected):
    (tmp_path / "afile").write_text("x")
    target = out if out.startswith("/") else str(tmp_path / out)
    assert main(["evaluate", "--checkpoint", checkpoint, "--out", target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and " — " in err


@pytest.mark.parametrize(("out", "expected"), [
    ("fig.xyz", "unknown figure format '.xyz'"),
    (".", "is a directory"),
])
def test_figure_output_problems_are_one_line(tmp_path, capsys, out, expected):
    target = str(tmp_path / out)
    assert main(["interactions", "plot", str(tmp_path), "--out", target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not Path(target).is_file()
