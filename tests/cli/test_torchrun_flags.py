"""Every flag of every command reaches narrows under torchrun: torchrun's own parser takes a
flag that names one of its options, or a prefix of one (argparse abbreviations), before the
command line is passed on."""

from __future__ import annotations

import argparse

import pytest

from narrows.cli import app

app._load_commands()

#: flags torchrun takes for itself, each with the second name that reaches narrows
KNOWN = {"--log": "--log-to"}


def _torchrun_options() -> list[str]:
    run = pytest.importorskip("torch.distributed.run")
    return [o for action in run.get_args_parser()._actions for o in action.option_strings]


def _flags(command: app.Command) -> list[list[str]]:
    parser = argparse.ArgumentParser()
    from narrows import config

    config.add_arguments(parser, command.config)
    return [a.option_strings for a in parser._actions if a.option_strings]


def test_no_flag_is_taken_by_torchrun():
    theirs = _torchrun_options()
    taken = set()
    for command in app.COMMANDS:
        for names in _flags(command):
            for name in names:
                if name not in ("-h", "--help") and name.startswith("--") and any(
                        o.startswith(name) for o in theirs):
                    taken.add(name)
                    assert name in KNOWN and KNOWN[name] in names, (command.words, name)
    assert taken == set(KNOWN)  # the exception is real (else drop it)
    for alias in KNOWN.values():
        assert not any(o.startswith(alias) for o in theirs)
