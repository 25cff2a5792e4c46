"""Typed command configs: one dataclass per command is the single source of truth.

Each field becomes a ``--flag`` (underscores become dashes), a key in ``--config file.yaml``
and a key in the run's saved ``config.yaml``, so the three cannot drift. Precedence: the
dataclass default, then the YAML file, then flags given on the command line.

This module does not import torch, so building the parser for ``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from narrows.errors import UserError

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    *,
    short: str | None = None,
    metavar: str | None = None,
    affects_result: bool = True,
    check: Callable[[Any], str | None] | None = None,
    positional: bool = False,
    group: str | None = None,
) -> Any:
    """Declare a config field.

    ``affects_result=False`` marks options (device, threads, output directory) that may change
    between a run and its resumption. ``check(value)`` returns an error message or ``None``.
    ``positional=True`` makes it a positional argument (``*`` for a list, ``?`` otherwise).
    """
    meta = {"help": help, "short": short, "metavar": metavar, "affects_result": affects_result,
            "check": check, "positional": positional, "group": group}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Range:
    """A check: every number (of a scalar or list option) lies in the interval; ``None`` passes.

    ``nan`` and ``inf`` are always refused: no option of narrows takes a non-finite number.
    ``rules`` are further checks of the whole value (for lists: increasing, distinct, not
    empty), each returning a message or ``None``. The bounds are data, so the tests generate
    out-of-range values from every option's range.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    rules: tuple[Callable[[Any], str | None], ...] = ()

    def describe(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"in [0, 1)"``: the interval in words."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return "a finite number"

    def contains(self, number: float) -> bool:
        if isinstance(number, float) and not math.isfinite(number):
            return False
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return not (self.high is not None
                    and (number >= self.high if self.high_open else number > self.high))

    def problem(self, number: float) -> str | None:
        """``"5 is not in [0, 1)"``, ``"nan is not a number"``, or ``None`` inside the interval."""
        if isinstance(number, float) and math.isnan(number):
            return "nan is not a number"
        if isinstance(number, float) and math.isinf(number):
            return f"{number} is not finite"
        return None if self.contains(number) else f"{_number(number)} is not {self.describe()}"

    def __call__(self, value: Any) -> str | None:
        if value is None:
            return None
        for number in value if isinstance(value, (list, tuple)) else [value]:
            message = self.problem(number)
            if message:
                return message
        for rule in self.rules:
            message = rule(value)
            if message:
                return message
        return None

    def holds_bounds(self, value: Any) -> bool:
        """Whether every number of ``value`` lies in the interval (the rules aside)."""
        numbers = value if isinstance(value, (list, tuple)) else [value]
        return value is None or all(self.problem(n) is None for n in numbers)

    def also(self, *rules: Callable[[Any], str | None]) -> Range:
        """This range with further whole-value rules."""
        return dataclasses.replace(self, rules=self.rules + rules)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def increasing(values: Any) -> str | None:
    """A rule for lists: strictly increasing (milestones, k values)."""
    if values and any(b <= a for a, b in itertools.pairwise(values)):
        return "values must be strictly increasing"
    return None


def distinct(values: Any) -> str | None:
    """A rule for lists: no value twice."""
    return "values must be distinct" if values and len(set(values)) != len(values) else None


def not_empty(values: Any) -> str | None:
    """A rule for lists given explicitly: at least one value."""
    return "give at least one value" if values is not None and len(values) == 0 else None


positive = Range(0, low_open=True)
"""A finite number > 0 (``inf`` is no learning rate or size)."""
non_negative = Range(0)
"""A finite number >= 0."""
unit_open = Range(0, 1, high_open=True)
"""In [0, 1): decays, momenta, label smoothing."""
fraction = Range(0, 1)
"""In [0, 1]: rates and proportions."""


def batch_size_option(default: int = 256, help: str = "images per forward pass") -> Any:
    """The ``batch_size`` field of a command that streams images (not part of its result)."""
    return option(default, help, check=positive, affects_result=False)


def workers_option() -> Any:
    """The ``workers`` field: data-loading worker processes (not part of the result)."""
    return option(0, "data-loading worker processes", check=non_negative, affects_result=False)


def save_every_option(default: int, saved: str = "the counts") -> Any:
    """The ``save_every`` field of a resumable streaming command: save ``saved`` every N
    batches (not part of the result)."""
    return option(default, f"save {saved} every N batches (a killed run resumes there)",
                  check=positive, affects_result=False)
seed_range = Range(0, 2**32 - 1)
"""Seeds numpy, torch and Python's random all take."""


def at_least(minimum: int) -> Range:
    """A check: a number >= ``minimum``."""
    return Range(minimum)


def range_of(field: dataclasses.Field) -> Range | None:
    """The declared :class:`Range` of a config field, if its check is one."""
    check = field.metadata.get("check")
    return check if isinstance(check, Range) else None


def compose(name: str, *groups: type) -> type:
    """The config dataclass of a command: every field of the option ``groups`` (dataclasses),
    as ``class name(*groups)`` would have them (the last group's fields first in --help)."""
    import sys

    composed = dataclasses.make_dataclass(name, [], bases=groups)
    composed.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)
    return composed


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any) -> tuple[Callable[[Any], Any], tuple | None]:
    """A converter from text (or YAML scalars) to ``tp``, and its choices if it is a Literal."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        return str, choices
    if tp is bool:
        return _to_bool, None
    if tp is int:
        return _to_int, None
    if tp is float:
        return float, None
    return str, None


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not an integer")
    return int(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def convert(cls: type, name: str, value: Any) -> Any:
    """Convert ``value`` to the type of field ``name``; a bad value is a :class:`UserError`."""
    tp, optional = _unwrap_optional(_hints(cls)[name])
    if value is None:
        if optional:
            return None
        raise UserError(f"option {flag_name(name)} cannot be empty", "give it a value")
    if isinstance(value, str) and not value.strip() and tp is str:
        raise UserError(f"option {flag_name(name)} cannot be empty",
                        f"give {flag_name(name)} a value, or leave it out for the default")
    try:
        if get_origin(tp) in (list, tuple):
            (item_tp, *_) = get_args(tp)
            items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
            parse, choices = _scalar_parser(item_tp)
            out = [parse(v) for v in items]
            bad = [v for v in out if choices and v not in choices]
            if bad:
                raise ValueError(f"{bad[0]!r} is not one of {', '.join(map(str, choices))}")
            return out
        parse, choices = _scalar_parser(tp)
        out = parse(value)
        if choices and out not in choices:
            raise ValueError(f"choose one of {', '.join(map(str, choices))}")
        return out
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"bad value {value!r} for {flag_name(name)}: {exc}",
            f"see 'narrows ... --help' for what {flag_name(name)} takes",
        ) from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls``; flags default to 'not given' so precedence works."""
    hints = _hints(cls)
    groups: dict[str, Any] = {}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: f.metadata.get("group") is not None)
    for f in ordered:
        tp, _ = _unwrap_optional(hints[f.name])
        meta = f.metadata
        target: Any = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        positional = meta.get("positional", False)
        names = [flag_name(f.name)] + ([meta["short"]] if meta.get("short") else [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta.get("help", "")
        if default not in (None, "", []) and "%(default)" not in help_text:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" [default: {shown}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": help_text.replace("%", "%%")}
        if positional:
            del kwargs["dest"]
            is_list = get_origin(tp) in (list, tuple)
            target.add_argument(f.name, nargs="*" if is_list else "?",
                                metavar=meta.get("metavar") or f.name.upper(), **kwargs)
            continue
        if tp is bool:
            target.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "+"
            item_choices = _scalar_parser(get_args(tp)[0])[1]
            if item_choices:
                kwargs["choices"] = item_choices
        else:
            choices = _scalar_parser(tp)[1]
            if choices:
                kwargs["choices"] = choices
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        target.add_argument(*names, **kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping of option names to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist", "check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}",
                        "fix the syntax (key: value per line)") from None
    return option_mapping(data, f"config file {path} must hold a mapping",
                          "write one 'option: value' per line")


def option_mapping(value: Any, problem: str, fix: str) -> dict[str, Any]:
    """``value`` (a mapping read from YAML, or ``None`` for none) with option names as
    identifiers (dashes become underscores); anything else is ``UserError(problem + " of option:
    value", fix)``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{problem} of option: value", fix)
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def build(cls: type[C], *layers: Mapping[str, Any], source: str = "options") -> C:
    """Make a ``cls`` from the defaults overlaid by each mapping in turn, converting and checking.

    Each field's ``check`` runs first, then the config's own ``check_together()`` if it has one
    (rules between options, e.g. milestones within the epochs), which raises a UserError.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer) - names)
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], sorted(names), n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"valid options: {', '.join(sorted(names))}"
            raise UserError(f"unknown option '{unknown[0]}' in {source}", fix)
        for key, value in layer.items():
            values[key] = convert(cls, key, value)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        raise UserError(f"option {flag_name(missing[0])} is required", f"pass {flag_name(missing[0])} VALUE")
    config = cls(**values)
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        message = check(getattr(config, f.name)) if check else None
        if message:
            value, flag = getattr(config, f.name), flag_name(f.name)
            if isinstance(check, Range) and not check.holds_bounds(value):
                many = isinstance(value, (list, tuple))
                raise UserError(f"{flag} {message}",
                                f"give {flag} {'values' if many else 'a value'} {check.describe()}")
            shown = value
            if isinstance(value, (list, tuple)):
                shown = " ".join(_number(v) if isinstance(v, (int, float))
                                 and not isinstance(v, bool) else str(v) for v in value) \
                    if value else "(empty)"
            raise UserError(f"{flag} {shown}: {message}", f"see --help for {flag}")
    together = getattr(config, "check_together", None)
    if callable(together):
        together()
    return config


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config for a parsed command line: defaults < ``--config`` file < flags."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(cls)}}
    layers: list[Mapping[str, Any]] = []
    config_path = getattr(args, "config", None)
    if config_path:
        layers.append(read_config_file(config_path))
    layers.append(given)
    layers[:0] = preset_layers(cls, layers)
    return build(cls, *layers, source=f"--config {config_path}" if config_path else "options")


def preset_layers(cls: type, layers: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The changes of the preset the ``layers`` name (a config class with a ``preset`` field
    and a ``PRESETS`` mapping of name → changes); they sit below the file and the flags."""
    presets = getattr(cls, "PRESETS", None)
    names = [layer["preset"] for layer in layers if layer.get("preset") is not None]
    if not presets or not names:
        return []
    if names[-1] not in presets:
        raise UserError(f"unknown preset '{names[-1]}'", f"use one of {', '.join(presets)}")
    return [presets[names[-1]]]


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def result_fields(config: Any) -> dict[str, Any]:
    """The options that change a run's results (compared when a run directory is reused)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get("affects_result", True)}


def settings_from(cls: type[C], options: Any, changes: Mapping[str, Any], owner: str) -> C:
    """An instance of the dataclass ``cls`` from the same-named attributes of ``options`` (e.g.
    a command's config; ``None`` gives the defaults), then ``changes``. ``owner`` names the
    function in the :class:`UserError` for an unknown name in ``changes``."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise UserError(f"unknown option `{unknown[0]}` of {owner}",
                        f"use one of: {', '.join(names)}")
    values = {n: getattr(options, n) for n in names if hasattr(options, n)}
    return cls(**{**values, **changes})
