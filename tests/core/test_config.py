"""Typed configs: precedence defaults < YAML file < flags; every bad value is a UserError."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from narrows import config
from narrows.config import option, positive
from narrows.errors import UserError


@dataclass
class Example:
    epochs: int = option(10, "epochs", check=positive)
    lr: float = option(0.1, "learning rate")
    name: str | None = option(None, "a name")
    schedule: Literal["cosine", "step"] = option("cosine", "schedule")
    milestones: list[int] = option([], "milestones")
    flag: bool = option(False, "a switch")
    device: str = option("auto", "device", affects_result=False)


def parse(argv: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    config.add_arguments(parser, Example)
    return config.from_args(Example, parser.parse_args(argv))


def test_defaults_then_file_then_flags(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("epochs: 3\nlr: 1e-3\nmilestones: [1, 2]\nflag: yes\n")
    cfg = parse(["--config", str(file), "--lr", "0.5"])
    assert cfg.epochs == 3  # from the file
    assert cfg.lr == 0.5  # the flag wins over the file
    assert cfg.milestones == [1, 2]
    assert cfg.flag is True
    assert cfg.schedule == "cosine"  # the default
    assert parse([]) == Example()


def test_yaml_scientific_notation_string_becomes_float(tmp_path):
    # PyYAML reads "1e-3" (no dot) as a string: the field type decides.
    file = tmp_path / "c.yaml"
    file.write_text("lr: 1e-3\n")
    assert parse(["--config", str(file)]).lr == pytest.approx(1e-3)


def test_dashes_in_file_keys_and_list_flags(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("milestones: 5 7\n")
    assert parse(["--config", str(file)]).milestones == [5, 7]
    assert parse(["--milestones", "4", "9"]).milestones == [4, 9]
    assert parse(["--flag"]).flag and not parse(["--no-flag"]).flag


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch: 3\n", "did you mean 'epochs'"),
        ("epochs: three\n", "bad value 'three' for --epochs"),
        ("epochs: 0\n", "--epochs 0 is not > 0"),
        ("epochs: 2.5\n", "--epochs"),
        ("schedule: linear\n", "choose one of cosine, step"),
        ("- a\n- b\n", "must hold a mapping"),
        ("epochs: [1\n", "not valid YAML"),
    ],
)
def test_bad_files_are_user_errors(tmp_path, text, message):
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(UserError, match=message):
        parse(["--config", str(file)])


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        parse(["--config", "/nonexistent/c.yaml"])


def test_result_fields_leave_out_runtime_options():
    fields = config.result_fields(Example())
    assert "device" not in fields and "epochs" in fields
