"""Typed command configs: one dataclass per command is the single source of truth.

Each field becomes a ``--flag`` (underscores become dashes), a key in ``--config file.yaml``
and a key in the run's saved ``config.yaml``, so the three cannot drift. Precedence: the
dataclass default, then the YAML file, then flags given on the command line.

This module does not import torch, so building the parser for ``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
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


def _infinite(value: Any) -> bool:
    return isinstance(value, float) and math.isinf(value)


def positive(value: Any) -> str | None:
    """A finite number > 0 (``inf`` is no learning rate or size)."""
    if value is None:
        return None
    if _infinite(value):
        return "must be finite"
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    """A finite number >= 0."""
    if value is None:
        return None
    if _infinite(value):
        return "must be finite"
    return None if value >= 0 else "must be >= 0"


def at_least(minimum: int) -> Callable[[Any], str | None]:
    """A check: a number >= ``minimum``."""
    def check(value: Any) -> str | None:
        return None if value is None or value >= minimum else f"must be >= {minimum}"

    return check


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
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value",
                        "write one 'option: value' per line")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build(cls: type[C], *layers: Mapping[str, Any], source: str = "options") -> C:
    """Make a ``cls`` from the defaults overlaid by each mapping in turn, converting and checking."""
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
            raise UserError(f"bad value {getattr(config, f.name)!r} for {flag_name(f.name)}: {message}",
                            f"see --help for {flag_name(f.name)}")
    return config


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config for a parsed command line: defaults < ``--config`` file < flags."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(cls)}}
    layers: list[Mapping[str, Any]] = []
    config_path = getattr(args, "config", None)
    if config_path:
        layers.append(read_config_file(config_path))
    layers.append(given)
    return build(cls, *layers, source=f"--config {config_path}" if config_path else "options")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def result_fields(config: Any) -> dict[str, Any]:
    """The options that change a run's results (compared when a run directory is reused)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get("affects_result", True)}
