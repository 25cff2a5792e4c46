"""docs/api.md runs: its Python blocks, top to bottom, in one namespace, in a fresh directory."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

API = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_api_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", API.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/api.md block {number}", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "test top-1 after one epoch" in out and "decomposed top-1" in out
    assert (tmp_path / "interactions" / "curve.csv").is_file()
    assert "kNN (T 0.07)" in out and "linear probe cls on" in out
    assert namespace["probe"].backbone_passes == 0  # the linear probe read kNN's feature cache
    assert list((tmp_path / "logged" / "tensorboard").glob("events.out.tfevents.*"))
    report = namespace["report"]
    assert (tmp_path / "report.html").is_file() and report.path == Path("report.html")
    assert "train" in report.commands and f"→ {report.path}" in out
