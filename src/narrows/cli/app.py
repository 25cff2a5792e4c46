"""The command registry and the argument parser built from it (no torch import here)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from narrows import __version__, config


@dataclass(frozen=True)
class Command:
    """A verb of the command line: its words, its typed config and where its code lives.

    ``target`` is ``"module:function"``; the module is imported only when the command runs,
    so ``narrows --help`` stays light. ``function(cfg) -> int`` returns the exit code.
    """

    words: tuple[str, ...]
    summary: str
    description: str
    config: type
    target: str
    epilog: str = ""

    def run(self, cfg: object) -> int:
        module, _, function = self.target.partition(":")
        return int(getattr(importlib.import_module(module), function)(cfg) or 0)


GROUPS: dict[str, str] = {}
COMMANDS: list[Command] = []


class UsageError(Exception):
    """A command line argparse could not parse; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} — run '{self.prog} --help' for the options")


def register(command: Command) -> Command:
    COMMANDS.append(command)
    return command


def command(words: str, config: type, function: Callable[..., int | None], *, summary: str,
            description: str, epilog: str = "") -> Command:
    """Register the command ``words`` (e.g. ``"decompose extract"``), run by ``function(cfg)``
    with a ``config`` instance; ``summary``, ``description`` and ``epilog`` make its --help."""
    return register(Command(tuple(words.split()), summary, description, config,
                            f"{function.__module__}:{function.__name__}", epilog))


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = _Parser(
        prog="narrows",
        description="narrows: a PyTorch toolkit for the bottlenecks of deep vision models.",
        epilog="Run 'narrows COMMAND --help' for the options of a command. "
        "Start with: narrows quickstart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"narrows {__version__}")
    top = parser.add_subparsers(dest="_command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        where = top
        prog_words = ["narrows"]
        for word in command.words[:-1]:
            if word not in groups:
                group = top.add_parser(word, help=GROUPS.get(word, ""), description=GROUPS.get(word, ""))
                groups[word] = group.add_subparsers(dest=f"_group_{word}", metavar="VERB",
                                                    parser_class=_Parser)
            where = groups[word]
            prog_words.append(word)
        sub = where.add_parser(
            command.words[-1],
            help=command.summary,
            description=command.description,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(_target=command)
        sub.add_argument("--config", metavar="FILE.yaml",
                         help="read options from a YAML file; flags given here override it")
        config.add_arguments(sub, command.config)
    return parser


def parse(argv: Sequence[str] | None) -> tuple[Command, object]:
    parser = build_parser()
    args, extras = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    command: Command | None = getattr(args, "_target", None)
    if extras:
        where = "narrows " + " ".join(command.words) if command else "narrows"
        raise UsageError(f"unrecognized arguments: {' '.join(extras)} — run '{where} --help' "
                         "for the options")
    if command is None:
        # 'narrows' or 'narrows GROUP' alone: show what there is.
        words = [v for k, v in vars(args).items() if k.startswith("_group_") or k == "_command"]
        if any(words):
            raise UsageError(f"'{' '.join(w for w in words if w)}' needs a verb — run "
                             f"'narrows {' '.join(w for w in words if w)} --help'")
        parser.print_help()
        raise SystemExit(0)
    return command, config.from_args(command.config, args)


COMMAND_MODULES = ("train", "evaluate", "models_cmd", "quickstart", "interactions",
                   "interactions_train", "attribution", "attribution_readout",
                   "attribution_sanity", "decompose", "decompose_analysis", "kvb", "kvb_toy", "sweep",
                   "ssl", "ssl_eval", "report")


def _load_commands() -> None:
    """Import every command module (each registers its commands once, when first imported)."""
    for module in COMMAND_MODULES:
        importlib.import_module(f"narrows.cli.{module}")
