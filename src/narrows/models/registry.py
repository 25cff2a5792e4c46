"""Model names: listing them, checking them, and building a model from one (never downloading).

A name is a timm model name (narrows' CIFAR models included) or the user's own ``nn.Module``:
``path/to/file.py:ClassName`` (the file is imported) or ``package.module:ClassName`` (an
importable module). The class, or any callable returning an ``nn.Module``, is called with
``num_classes=`` and ``in_chans=`` where its signature takes them, plus the model kwargs.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import nn

from narrows.errors import UserError

# Importing these registers narrows' own architectures with timm.
from narrows.models import cifar_alexnet as _cifar_alexnet  # noqa: F401
from narrows.models import cifar_resnet as _cifar_resnet  # noqa: F401
from narrows.models.strict import cfg_head_and_stem

NARROWS_MODELS: tuple[str, ...] = (
    "resnet20_cifar",
    "resnet32_cifar",
    "resnet44_cifar",
    "resnet56_cifar",
    "resnet110_cifar",
    "alexnet_cifar",
)


def list_models(pattern: str = "*") -> list[str]:
    """timm model names matching the shell-style ``pattern``, narrows' own first.

    A pattern without ``*``, ``?`` or ``[`` matches as a substring (``"vit"`` means ``"*vit*"``).
    """
    pattern = pattern.strip().lower() or "*"
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = timm.list_models(pattern)
    found = set(names)
    ours = [n for n in NARROWS_MODELS if n in found]
    return ours + [n for n in names if n not in NARROWS_MODELS]


def suggest(name: str, limit: int = 5) -> list[str]:
    """Registered names close to ``name``: those containing it first, then spelling neighbours."""
    query = name.strip().lower()
    names = list_models("*")
    containing = sorted(
        (n for n in names if query and query in n),
        key=lambda n: (n not in NARROWS_MODELS, not n.startswith(query), len(n)),
    )
    close = difflib.get_close_matches(query, names, n=limit, cutoff=0.6)
    return list(dict.fromkeys(containing[:limit] + close))[:limit]


@dataclass(frozen=True)
class CustomModel:
    """The parts of a ``file.py:ClassName`` or ``package.module:ClassName`` model name."""

    source: str  # the .py file (as given) or the module path
    attribute: str  # the class (or factory function) name, dotted for nested attributes
    is_file: bool

    @property
    def name(self) -> str:
        return f"{self.source}:{self.attribute}"


_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_custom(name: str) -> CustomModel | None:
    """The parts of a user model name (``file.py:Class`` or ``module:Class``), else ``None``.

    timm names never hold ``:`` except hub names (``hf-hub:...``), which are not user models.
    """
    if not isinstance(name, str) or ":" not in name:
        return None
    source, _, attribute = name.rpartition(":")
    if source.lower().startswith(("hf-hub", "hf_hub", "timm/")):
        return None
    if source.endswith(".py") or "/" in source or "\\" in source:
        return CustomModel(source, attribute, True)
    if _MODULE_PATH.fullmatch(source):
        return CustomModel(source, attribute, False)
    return None


def is_custom(name: str) -> bool:
    """Whether ``name`` names the user's own module (``file.py:Class`` or ``module:Class``)."""
    return parse_custom(name) is not None


def canonical_name(name: str) -> str:
    """The name to record in a model card: a ``file.py:Class`` name with the file made absolute."""
    custom = parse_custom(name)
    if custom is None or not custom.is_file:
        return name
    return f"{Path(custom.source).expanduser().resolve()}:{custom.attribute}"


def display_name(name: str) -> str:
    """A short name for titles and directory names: the class of a user model, else ``name``."""
    custom = parse_custom(name)
    return custom.attribute if custom is not None else name


_IMPORTED: dict[Path, Any] = {}


def _import_file(path: Path) -> Any:
    """Import the Python file ``path`` once per process (under a name made from its path)."""
    if path in _IMPORTED:
        return _IMPORTED[path]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"narrows_user_model_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path} as Python", "give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code may raise anything while importing
        sys.modules.pop(module_name, None)
        raise UserError(
            f"importing {path} failed: {type(exc).__name__}: {_first_line(exc)}",
            "fix the error in that file (run 'python " + str(path) + "' to see it)",
        ) from exc
    _IMPORTED[path] = module
    return module


def resolve_custom(name: str) -> Any:
    """The class (or factory) a user model name points to; a missing file, module or class is
    a :class:`UserError`."""
    custom = parse_custom(name)
    if custom is None:
        raise ValueError(f"{name!r} is not a user model name")
    if not custom.attribute:
        raise UserError(f"model '{name}' names no class after ':'",
                        "write it as path/to/file.py:ClassName")
    if custom.is_file:
        path = Path(custom.source).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"model file {path} does not exist",
                            "check the path in --model path/to/file.py:ClassName")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(custom.source)
        except ImportError as exc:
            raise UserError(
                f"cannot import module '{custom.source}' for model '{name}': {_first_line(exc)}",
                "install the package, or name a file: --model path/to/file.py:ClassName",
            ) from exc
        except Exception as exc:  # the user's code may raise anything while importing
            raise UserError(
                f"importing module '{custom.source}' failed: {type(exc).__name__}: "
                f"{_first_line(exc)}", "fix the error in that module",
            ) from exc
    target: Any = module
    for part in custom.attribute.split("."):
        if not hasattr(target, part):
            found = sorted(
                n for n, v in vars(module).items()
                if isinstance(v, type) and issubclass(v, nn.Module) and
                getattr(v, "__module__", None) == module.__name__
            )
            hint = f"it defines {', '.join(found)}" if found else "it defines no nn.Module class"
            raise UserError(f"{custom.source} has no '{custom.attribute}'",
                            f"{hint}; write --model {custom.source}:ClassName")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"'{name}' is not a class or function",
                        "name an nn.Module class (or a function returning one)")
    return target


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _build_custom(
    name: str, num_classes: int | None, in_chans: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    target = resolve_custom(name)
    try:
        params = dict(inspect.signature(target).parameters)
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # no signature to read (builtins): pass the sizes
        params, open_kwargs = {}, True
    args = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if value is not None and key not in args and (key in params or open_kwargs):
            args[key] = value
    try:
        model = target(**args)
    except UserError:
        raise
    except Exception as exc:  # the user's constructor may raise anything
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "no arguments"
        raise UserError(
            f"cannot build {name} with {shown}: {type(exc).__name__}: {_first_line(exc)}",
            "check its constructor; pass further arguments with --model-kwargs key=value,...",
        ) from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"{name} returned a {type(model).__name__}, not an nn.Module",
                        "name an nn.Module class (or a function returning one)")
    return model


def check_name(name: str) -> None:
    """Raise :class:`UserError` unless ``name`` (optionally ``arch.tag``) is a timm model or a
    user model (``file.py:Class``, ``module:Class``) that can be found."""
    if is_custom(name):
        resolve_custom(name)
        return
    if not isinstance(name, str) or not timm.is_model(name):
        close = suggest(str(name))
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown model '{name}'",
            f"{hint}list the names with: narrows models PATTERN (or give your own module "
            "as path/to/file.py:ClassName)",
        )
    if "." in name:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError as exc:
            arch = timm.models.get_arch_name(name)
            raise UserError(
                f"unknown tag in model name '{name}'", f"use the plain name '{arch}'"
            ) from exc


def head_and_stem(name: str) -> tuple[str | None, str | None]:
    """Module names of the classifier and first conv of architecture ``name``, when timm knows them."""
    if is_custom(name):
        return None, None
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg_head_and_stem(None if cfg is None else cfg.to_dict())


def build(
    name: str, *, num_classes: int | None = None, in_chans: int | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)`` with bad options as :class:`UserError`.

    ``None`` arguments keep timm's defaults. ``pretrained=True`` is refused: narrows never downloads.
    A user model name (``file.py:Class``, ``module:Class``) calls that class instead.
    """
    if is_custom(name):
        return _build_custom(name, num_classes, in_chans, kwargs)
    check_name(name)
    if kwargs.pop("pretrained", False):
        raise UserError(
            "narrows does not download pretrained weights",
            "load trained weights with --checkpoint PATH",
        )
    args = {k: v for k, v in kwargs.items() if v is not None}
    if num_classes is not None:
        args["num_classes"] = num_classes
    if in_chans is not None:
        args["in_chans"] = in_chans
    try:
        return timm.create_model(name, pretrained=False, **args)
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "default options"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"cannot build {name} with {shown}: {first}",
            "check the model options (see timm's documentation of this model)",
        ) from exc
