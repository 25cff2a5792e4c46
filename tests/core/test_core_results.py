"""The core's result pieces: one table format, the cached step, the file header."""

from __future__ import annotations

import csv
import io
import math

import pytest

from narrows.errors import UserError
from narrows.runs import RunDir
from narrows.runs.results import check_header, header, provenance
from narrows.runs.tables import csv_text, markdown_cell, markdown_text


def test_csv_round_trips_numbers_and_missing_values():
    rows = [{"a": 1, "b": 0.123456789, "c": "x"}, {"a": 2, "b": math.nan}]
    text = csv_text(rows)
    back = list(csv.DictReader(io.StringIO(text)))
    assert back[0] == {"a": "1", "b": "0.123457", "c": "x"}
    assert back[1]["b"] == "nan" and back[1]["c"] == "nan"  # NaN and a missing cell alike
    assert float(back[1]["b"]) != float(back[1]["b"])  # "nan" parses as NaN (as pandas reads it)


def test_markdown_formats_numbers_one_way():
    assert markdown_cell(0.123456) == "0.1235"
    assert markdown_cell(math.nan) == "—" and markdown_cell(None) == "—"
    assert markdown_cell(12345.678) == "12,346" and markdown_cell(123456.0) == "1.235e+05"
    assert markdown_cell(50_000) == "50,000" and markdown_cell(True) == "True"
    table = markdown_text([{"method": "iba", "score": 0.5}, {"method": "a|b", "score": None}])
    lines = table.splitlines()
    assert lines[0] == "| method | score |" and lines[1] == "|---|---:|"
    assert lines[3] == "| a\\|b | — |"


def test_cached_computes_once_then_loads(tmp_path):
    run = RunDir(tmp_path / "run")
    calls = []

    def compute():
        calls.append(1)
        return {"x": 3}

    def load(path):
        import json

        return json.loads(path.read_text())

    def save(result, path):
        path.write_text(__import__("json").dumps(result))

    assert run.cached("r.json", compute, load, save) == {"x": 3}
    assert run.cached("r.json", compute, load, save) == {"x": 3}
    assert calls == [1]
    reader = RunDir(tmp_path / "other", writer=False)  # a non-writing rank computes, saves nothing
    assert reader.cached("r.json", compute, load, save) == {"x": 3}
    assert not (tmp_path / "other").exists()


def test_write_table_writes_both_forms(tmp_path):
    run = RunDir(tmp_path / "t")
    run.write_table("table", [{"k": 1, "v": 0.5}])
    assert (tmp_path / "t" / "table.csv").read_text() == "k,v\n1,0.5\n"
    assert "| k | v |" in (tmp_path / "t" / "table.md").read_text()


def test_header_names_kind_version_and_provenance():
    head = header("thing", 2, provenance(model="m", seed=3, compute={"seconds": 1.5}))
    assert head["format"] == "narrows.thing/2"
    origin = head["provenance"]
    assert origin["model"] == "m" and origin["seed"] == 3 and "torch" in origin["versions"]
    assert "data" not in origin
    check_header(head, "thing", 2, "f")
    check_header({}, "thing", 2, "f")  # files from before headers
    with pytest.raises(UserError, match="not narrows.thing"):
        check_header({"format": "narrows.other/1"}, "thing", 2, "f")
    with pytest.raises(UserError, match="newer narrows"):
        check_header({"format": "narrows.thing/3"}, "thing", 2, "f")
