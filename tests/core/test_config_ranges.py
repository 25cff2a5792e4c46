"""Every numeric option of every command has a declared range, and values outside it
(below, above, nan, inf; inside lists too) are refused before any work, naming the flag."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from narrows import config
from narrows.cli import app, main
from narrows.errors import UserError

app._load_commands()


def _numeric_fields():
    for command in app.COMMANDS:
        hints = typing.get_type_hints(command.config)
        for field in dataclasses.fields(command.config):
            tp, _ = config._unwrap_optional(hints[field.name])
            is_list = typing.get_origin(tp) in (list, tuple)
            item = typing.get_args(tp)[0] if is_list else tp
            if item in (int, float):
                yield command, field, item, is_list


FIELDS = list(_numeric_fields())
IDS = [f"{' '.join(c.words)}--{f.name}" for c, f, _, _ in FIELDS]


def _required(cls) -> dict[str, str]:
    return {f.name: "x" for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _outside(bounds: config.Range, item: type) -> list[float]:
    """Values just outside ``bounds`` (the open end itself, or one step past a closed end)."""
    step = 1 if item is int else 0.5
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - step)
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else bounds.high + step)
    if item is float:
        values += [math.nan, math.inf, -math.inf]
    return values


def test_there_are_numeric_options_to_check():
    assert len(FIELDS) > 150


@pytest.mark.parametrize(("command", "field", "item", "is_list"), FIELDS, ids=IDS)
def test_every_numeric_option_has_a_range_that_refuses_what_lies_outside(command, field, item,
                                                                          is_list):
    bounds = config.range_of(field)
    assert bounds is not None, f"{IDS[FIELDS.index((command, field, item, is_list))]} has no Range"
    assert bounds.low is not None, "every numeric option needs at least a lower bound"
    base = _required(command.config)
    default = config.build(command.config, base)  # the defaults lie inside their ranges
    flag = config.flag_name(field.name)
    for bad in _outside(bounds, item):
        given = [bad] if is_list else bad
        with pytest.raises(UserError, match=f"^{flag} ") as caught:
            config.build(command.config, base, {field.name: given})
        assert flag in caught.value.fix, "the fix names the option and its range"
    edge = bounds.low if not bounds.low_open else (bounds.low + 1 if item is int else None)
    if edge is not None and bounds.contains(edge) and not bounds.rules:
        value = item(edge)
        try:
            built = config.build(command.config, base, {field.name: [value] if is_list else value})
        except UserError as exc:  # a rule between options may refuse the edge; never the range
            assert not str(exc).startswith(flag + " "), exc
        else:
            assert getattr(built, field.name) == ([value] if is_list else value)
    assert default is not None


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "--lr", "inf"], "--lr inf is not finite — give --lr a value > 0"),
    (["train", "--weight-decay", "inf"], "--weight-decay inf is not finite"),
    (["train", "--lr", "nan"], "--lr nan is not a number"),
    (["train", "--model", ""], "option --model cannot be empty"),
    (["train", "--milestones", "5", "3"], "--milestones 5 3: values must be strictly increasing"),
    (["train", "--milestones", "-1"], "--milestones -1 is not >= 1"),
    (["train", "--epochs", "4", "--milestones", "5"], "--milestones 5 lies beyond --epochs 4"),
    (["train", "--label-smoothing", "1.5"], "--label-smoothing 1.5 is not in [0, 1)"),
    (["attribution", "evaluate", "--points", "1"], "--points 1 is not >= 2"),
    (["decompose", "extract", "--checkpoint", "x.pt", "--ks", "0", "-1"], "--ks 0 is not >= 1"),
    (["decompose", "extract", "--checkpoint", "x.pt", "--thresholds", "1.5", "-1"],
     "--thresholds 1.5 is not in (0, 1]"),
    (["decompose", "extract", "--checkpoint", "x.pt", "--thresholds", "nan"], "nan is not a number"),
    (["decompose", "validate", "--checkpoint", "x.pt", "--ks", "0"], "--ks 0 is not >= 1"),
    (["kvb", "toy", "--decay", "5"], "--decay 5 is not in [0, 1)"),
    (["interactions", "run", "--ratios", "0.5", "0.2"], "--ratios 0.5 0.2: values must be strictly"),
])
def test_the_reported_values_are_one_line_before_any_work(capsys, tmp_path, monkeypatch, args,
                                                          expected):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert list(tmp_path.iterdir()) == []
