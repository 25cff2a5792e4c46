"""``narrows sweep SWEEP.yaml``: a grid of runs of any command, resumable, one results table
(the runner is :mod:`narrows.runs.sweep`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from narrows.cli.app import Command, command
from narrows.config import option
from narrows.runs.session import CommonOptions


@dataclass
class SweepConfig(CommonOptions):
    file: str | None = option(None, "the sweep's YAML file (command, options, grid)",
                              positional=True, metavar="SWEEP.yaml")
    wandb: bool = option(False, "also log each run's results to Weights & Biases (needs the "
                         "package wandb)", affects_result=False)
    wandb_project: str | None = option(None, "W&B project [default: the YAML's wandb_project, "
                                       "else narrows]", affects_result=False)
    dry_run: bool = option(False, "list the runs of the grid (done or to do) and stop",
                           affects_result=False)


def find_command(words: tuple[str, ...], group: str | None = None) -> Command:
    """The registered command named by ``words``; the error lists those of ``group`` (all
    commands without one), sweeps left out."""
    import importlib

    from narrows.cli.app import COMMAND_MODULES, COMMANDS
    from narrows.errors import UserError

    for module in COMMAND_MODULES:  # each registers its commands when first imported
        importlib.import_module(f"narrows.cli.{module}")
    for known in COMMANDS:
        if known.words == words:
            return known
    names = sorted(" ".join(c.words) for c in COMMANDS
                   if (group is None or c.words[0] == group) and c.words[-1] != "sweep")
    raise UserError(f"no command 'narrows {' '.join(words)}'",
                    f"the sweep's command must be one of: {', '.join(names) or 'kvb toy'}")


def require_wandb() -> Any:
    """The wandb module, or a one-line :class:`UserError` naming the missing package."""
    import importlib

    from narrows.errors import UserError

    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise UserError("--wandb needs the package 'wandb', which is not installed",
                        "install it (pip install wandb) or run without --wandb") from None


def sweep_command(cfg: SweepConfig, words: tuple[str, ...] = ("sweep",),
                  group: str | None = None) -> int:
    """Run ``cfg``'s sweep as the command ``words`` (``kvb sweep`` is ``group`` kvb: its
    directory, W&B project and error messages say kvb)."""
    from narrows import config as cfgmod
    from narrows.errors import UserError
    from narrows.runs import default_out
    from narrows.runs.sweep import plan_sweep, read_sweep, run_sweep

    if not cfg.file:
        raise UserError("no sweep file given", f"run 'narrows {' '.join(words)} SWEEP.yaml'")
    sweep = read_sweep(cfg.file)
    wandb = require_wandb() if cfg.wandb and not cfg.dry_run else None
    prefix = f"{group}-" if group else ""
    out = Path(cfg.out) if cfg.out else default_out(f"{prefix}sweep", sweep.name)
    plan = plan_sweep(sweep, out, lambda w: find_command(w, group),
                      base_options=cfg.inherited(), file=cfg.file)
    if cfg.dry_run:
        for run in plan.runs:
            print(f"{'done' if run.done else 'to do':>6}  {run.path}  {run.combo}")
        print(f"{len(plan.runs)} run(s) of {plan.label}")
        return 0
    run_sweep(plan, run_command=" ".join(words), options=cfgmod.to_dict(cfg),
              overwrite=cfg.overwrite, wandb=wandb, wandb_project=cfg.wandb_project,
              default_project=f"narrows-{group}" if group else "narrows")
    return 0


def execute_sweep(cfg: SweepConfig) -> int:
    return sweep_command(cfg)


SWEEP_BEHAVIOUR = (
    "every combination runs locally, one after the other, in OUT/runs/<option=value-...>. A run "
    "whose directory holds results.json is finished and skipped, so rerunning the sweep (or "
    "growing its grid) does only what is missing; an interrupted run resumes as its command "
    "does. The numbers of each run's results.json ('metrics' picks dotted keys; default: every "
    "number at the top level and one level down) form results.csv and results.md in OUT. With "
    "--wandb (package wandb installed) each run's options and numbers are also logged to "
    "Weights & Biases.")


def sweep_epilog(words: str) -> str:
    """The example SWEEP.yaml and command line of ``narrows WORDS``."""
    return ("example SWEEP.yaml:\n  command: kvb toy\n  options: {seeds: [0, 1]}\n  grid:\n"
            "    steps: [100, 1000]\n    kv_lr: [0.001, 0.01]\n  metrics: [final_kv-1x400, "
            f"final_mlp]\n\n  narrows {words} sweep.yaml [--out DIR] [--wandb --wandb-project "
            "NAME] [--dry-run]")


command(
    "sweep", SweepConfig, execute_sweep,
    summary="run a grid over the options of any command (resumable) into one results table",
    description="SWEEP.yaml names a command (e.g. 'command: kvb toy' or 'command: evaluate'), "
    "'options' every run shares and a 'grid' of option: [values]; " + SWEEP_BEHAVIOUR,
    epilog=sweep_epilog("sweep"))
