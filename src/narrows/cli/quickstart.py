"""``narrows quickstart``: the first thing to run. Each system adds its step here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from narrows.cli.app import command
from narrows.config import option, positive
from narrows.runs.session import CommonOptions, start


@dataclass
class QuickstartConfig(CommonOptions):
    epochs: int = option(15, "epochs of ResNet-20 training on digits", check=positive)
    batch_size: int = option(64, "training batch size", check=positive)
    lr: float = option(0.1, "peak SGD learning rate (cosine schedule)", check=positive)


@dataclass(frozen=True)
class Step:
    """One stage of the quickstart: ``run(cfg, out) -> one-line summary``."""

    name: str
    run: Callable[[QuickstartConfig, Path], str]


def train_step(cfg: QuickstartConfig, out: Path) -> str:
    from narrows.cli.train import TrainConfig, execute

    execute(TrainConfig(model="resnet20_cifar", data="digits", epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, **cfg.inherited(out / "train")))
    return f"ResNet-20 trained on digits: {out / 'train'} (best.pt, curves.png, metrics.jsonl)"


def evaluate_step(cfg: QuickstartConfig, out: Path) -> str:
    import json

    from narrows.cli.evaluate import EvaluateConfig, execute

    execute(EvaluateConfig(checkpoint=str(out / "train" / "best.pt"),
                           **cfg.inherited(out / "evaluate")))
    result = json.loads((out / "evaluate" / "results.json").read_text())
    return (f"test accuracy {100 * result['top1']:.2f}% on {result['n']} digits: "
            f"{out / 'evaluate' / 'results.json'}")


def interactions_step(cfg: QuickstartConfig, out: Path) -> str:
    from narrows.cli.interactions import CompareConfig, execute_compare

    train = out / "train"
    execute_compare(CompareConfig(
        models=[f"trained={train / 'best.pt'}", f"init={train / 'init.pt'}"],
        preset="cpu-small", images=5, pairs=10, **cfg.inherited(out / "interactions")))
    return (f"interaction curves, trained vs initialisation (cpu-small, 5 images, 10 pairs): "
            f"{out / 'interactions' / 'compare.png'}")


def _later(module: str) -> Callable[[QuickstartConfig, Path], str]:
    """The ``quickstart_step`` of the command module ``module``, imported when it runs (the
    modules register their commands in their own order)."""
    import importlib

    return lambda cfg, out: importlib.import_module(module).quickstart_step(cfg, out)


def kvb_step(cfg: QuickstartConfig, out: Path) -> str:
    from narrows.cli.kvb import quickstart_step as incremental
    from narrows.cli.kvb_toy import quickstart_step as toy

    return f"{toy(cfg, out)}; {incremental(cfg, out)}"


STEPS: list[Step] = [
    Step("train", train_step),
    Step("evaluate", evaluate_step),
    Step("interactions", interactions_step),
    Step("attribution", _later("narrows.cli.attribution")),
    Step("decompose", _later("narrows.cli.decompose")),
    Step("kvb", kvb_step),
    Step("ssl", _later("narrows.cli.ssl")),
]


def execute(cfg: QuickstartConfig) -> int:
    from narrows.runs.report import write_report

    session = start(cfg)
    run = session.open(cfg, "quickstart", "quickstart")
    summaries = []
    for index, step in enumerate(STEPS, 1):
        began = time.perf_counter()
        print(f"\n== quickstart step {index}/{len(STEPS)}: {step.name}")
        summaries.append((step.name, step.run(cfg, run.path), time.perf_counter() - began))
    print("\n== quickstart finished; results:")
    for name, summary, seconds in summaries:
        print(f"  {name:<10} {summary}  [{seconds:.0f}s]")
    run.write_json("results.json", {"command": "quickstart", "summary": f"{len(STEPS)} steps in "
                                    f"{sum(s for *_, s in summaries):.0f} s",
                                    **{name: summary for name, summary, _ in summaries}})
    report = write_report([run.path], run.file("report.html"), title="narrows quickstart")
    print(f"\nall of it on one page: {report.summary()}")
    return 0


command(
    "quickstart", QuickstartConfig, execute,
    summary="train ResNet-20 on the embedded digits, evaluate it, measure its interactions, "
    "explain a shapes classifier, decompose the digits head, learn digits class by class "
    "through a key-value bottleneck, pretrain a ViT with UDI",
    description="The first thing to run: trains a CIFAR ResNet-20 on scikit-learn's digits "
    "(3×32×32), evaluates it, measures its multi-order interaction curve against the same "
    "network at initialisation; then trains a ResNet-20 on synthetic shapes and compares IBA "
    "heatmaps with Captum baselines (degradation, bounding boxes); finds each digit's "
    "influential channels and the decomposed head's accuracy against k; runs the key-value "
    "bottleneck's toy experiment and class-incremental digits through the frozen ResNet-20; "
    "pretrains a small ViT on shapes with UDI and measures its teacher's kNN accuracy; and "
    "prints where each result is, and writes report.html, one page of all its runs. Needs no download; the baselines need the extra narrows[baselines]. Re-running resumes "
    "any unfinished step.")
