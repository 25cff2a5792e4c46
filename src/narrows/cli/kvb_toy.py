"""``narrows kvb toy`` (the 2-D experiment of Figure 2) and ``narrows kvb sweep`` (an alias of
``narrows sweep``: a grid of runs of any command, resumable, one results table)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from narrows.cli.app import GROUPS, command
from narrows.cli.sweep import SWEEP_BEHAVIOUR, SweepConfig, sweep_command, sweep_epilog
from narrows.config import compose, option
from narrows.kvb.options import DEFAULT_SEEDS as TOY_DEFAULT_SEEDS
from narrows.kvb.options import ToyOptions
from narrows.kvb.registry import TOY_MODEL_NAMES as TOY_MODELS  # noqa: F401  (re-exported)
from narrows.kvb.toy_run import RESULTS
from narrows.runs.session import CommonOptions, start

GROUPS.setdefault("kvb", "the discrete key-value bottleneck: frozen-encoder class-incremental "
                         "learning, the 2-D toy, sweeps")
DEFAULT_SEEDS = list(TOY_DEFAULT_SEEDS)
QUICKSTART_MODELS = ("linear", "mlp", "kv-1x400", "kv-20x20")  # the rows of Figure 2


ToyConfig = compose("ToyConfig", ToyOptions, CommonOptions)


# -- toy --------------------------------------------------------------------------------------
def execute_toy(cfg: ToyConfig) -> int:
    import time

    from narrows.kvb.toy_run import ToySettings, run_toy
    from narrows.runtime import format_duration

    session = start(cfg)
    run = session.open(cfg, "kvb toy", "kvb-toy")
    say = session.say
    say(f"toy experiment: {len(cfg.models)} models × {len(dict.fromkeys(cfg.seeds))} seed(s), "
        f"4 stages × {cfg.steps} steps → {run.path}")
    began = time.perf_counter()
    result = run_toy(ToySettings.from_options(cfg), run=run, say=say,
                     threads=cfg.threads or 1)  # tiny tensors: 1 thread by default
    result.save(run)
    say(f"\n{result.table()}\n")
    say(f"({format_duration(time.perf_counter() - began)}) → {run.file('toy.md')}, toy.csv, "
        f"toy.png, {RESULTS}")
    return session.done()


# -- quickstart -------------------------------------------------------------------------------
def quickstart_step(cfg: CommonOptions, out: Path) -> str:
    """The toy experiment with one seed and the four models of the paper's figure (seconds),
    into ``out/kvb-toy``."""

    target = out / "kvb-toy"
    execute_toy(ToyConfig(**{**cfg.inherited(target), "seeds": [cfg.seed],
                             "models": list(QUICKSTART_MODELS)}))
    from narrows.runs.files import read_json_file

    results = read_json_file(target / RESULTS, "toy results file", kind=dict)
    parts = [f"{name} {results[f'final_{name}']:.2f}"
             for name in ("kv-1x400", "kv-20x20", "mlp", "linear")]
    return (f"2-D toy, class-incremental, final 8-class accuracy: {', '.join(parts)}: "
            f"{target / 'toy.png'}")


# -- sweep (an alias of 'narrows sweep') --------------------------------------------------------
@dataclass
class KvbSweepConfig(SweepConfig):
    wandb_project: str | None = option(None, "W&B project [default: the YAML's wandb_project, "
                                       "else narrows-kvb]", affects_result=False)


def execute_sweep(cfg: KvbSweepConfig) -> int:
    return sweep_command(cfg, ("kvb", "sweep"), group="kvb")


command(
    "kvb toy", ToyConfig, execute_toy,
    summary="the 2-D toy of Figure 2: 8 Gaussian classes in 4 stages; KV bottlenecks vs linear "
    "probe, MLP and VQ + MLP",
    description="Eight Gaussian classes (σ 0.035) in the unit square arrive in four stages of "
    "two. Each model trains on the current stage only (full batch, --steps steps per stage, "
    "cross-entropy over all 8 classes): a linear probe (Adam 1e-2) and an MLP 2-32-8 (Adam "
    "1e-3), both with a new optimiser per stage; a VQ layer (frozen keys) with a trainable MLP "
    "decoder; key-value bottlenecks with 1 codebook × 400 pairs (identity heads; Adam and SGD) "
    "and 20 × 20 (random projections). Keys are fitted by EMA k-means on uniform unlabelled "
    "points and frozen; only values train. KV models are evaluated with never-fetched pairs "
    "pruned, and without. Writes toy.csv (every model, seed, stage and class), toy.md (the "
    "tables), toy.png (decision maps per model and stage, first seed) and results.json. Seeds "
    "finished before are loaded, not rerun. The seeds of a model train in lockstep (one batched "
    "step; each seed gets exactly its own update), single-threaded unless --threads is given "
    "(the tensors are tiny).",
    epilog="examples:\n  narrows kvb toy\n  narrows kvb toy --seeds 0 --models kv-1x400 mlp "
    "--steps 200")
command(
    "kvb sweep", KvbSweepConfig, execute_sweep,
    summary="run a grid over the options of a kvb command (resumable) into one results table "
    "(an alias of 'narrows sweep')",
    description="SWEEP.yaml names a command ('command: kvb toy' or 'command: kvb train'), "
    "'options' every run shares and a 'grid' of option: [values]; " + SWEEP_BEHAVIOUR,
    epilog=sweep_epilog("kvb sweep"))
