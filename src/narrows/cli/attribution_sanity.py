"""``narrows attribution sanity``: the cascading model-parameter randomisation check."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from narrows.cli.app import Command, register
from narrows.cli.attribution import (
    IBAOptions,
    ImageChoice,
    LayerSubject,
    StatisticsOptions,
    _attribute,
    _batch,
    _method_names,
    _split_names,
    _statistics,
    _subject,
    check_methods,
    n_samples,
    pick_indices,
)
from narrows.cli.common import CommonOptions, open_run, replace, start
from narrows.config import option, positive

if TYPE_CHECKING:
    import torch

    from narrows.attribution.metrics import RandomisationResult
    from narrows.runs import RunDir


@dataclass
class SanityConfig(ImageChoice, IBAOptions, StatisticsOptions, LayerSubject, CommonOptions):
    methods: str = option("iba,saliency,gradcam", "comma-separated methods; each one's result "
                          "is cached in sanity_<method>.pt", affects_result=False)
    images: int = option(16, "check on N test images (chosen by --select)", check=positive)
    repeats: int = option(2, "runs of each method on the unmodified model; their mutual "
                          "agreement is the run-to-run noise floor (needs ≥ 2)", check=positive)
    randomise: str | None = option(None, "comma-separated layers to re-initialise, top "
                                   "(output) first, cumulatively [default: the model's "
                                   "top-level children with parameters, last called first]",
                                   metavar="LAYERS")


def _iba(cfg: SanityConfig, net, stats, bundle, normalizer, session, run: RunDir,
         probe: torch.Tensor):
    """IBA as ``attribute(model, inputs, targets)``, re-estimating statistics when needed.

    Once a layer at or below the bottleneck is re-initialised, the bottleneck sees other
    features, so IBA is given statistics of the randomised model (saved as
    statistics_randomised_<k>.pt). A change is detected by the bottleneck's output on ``probe``.
    """
    import torch

    from narrows.attribution import default_layer, run_to_layer

    layer = cfg.layer or default_layer(net)
    fresh = replace(cfg, statistics=None)

    def features(model) -> torch.Tensor:
        with torch.no_grad():
            return run_to_layer(model, layer, probe).cpu()

    known = [(features(net), stats)]

    def attribute(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen = features(model)
        match = next((s for f, s in known if f.shape == seen.shape
                      and torch.allclose(f, seen, rtol=1e-4, atol=1e-6)), None)
        if match is None:
            path = run.file(f"statistics_randomised_{len(known)}.pt")
            match = _statistics(fresh, model, bundle, normalizer, session, path,
                                re_estimate=True)
            known.append((seen, match))
        return torch.from_numpy(_attribute("iba", model, inputs, targets, cfg, match).heatmaps)

    return attribute


def _baseline(method: str, cfg: SanityConfig):
    """A baseline as ``attribute(model, inputs, targets)``."""
    import torch

    def attribute(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_attribute(method, model, inputs, targets, cfg, None).heatmaps)

    return attribute


def _cached(run: RunDir, method: str, indices: list[int]) -> RandomisationResult | None:
    from narrows.attribution.metrics import RandomisationResult

    path = run.file(f"sanity_{method}.pt")
    if not path.is_file():
        return None
    result = RandomisationResult.load(path)
    return result if result.meta.get("indices") == indices else None


def execute_sanity(cfg: SanityConfig) -> int:
    from narrows.attribution.metrics import cascade_layers, cascading_randomisation
    from narrows.attribution.metrics.randomisation import check_layers
    from narrows.runs import default_out

    methods = _split_names(cfg.methods, "methods", _method_names())
    session = start(cfg)
    net, bundle, normalizer, name, stem = _subject(cfg)
    dataset = bundle.split("test")
    indices = pick_indices(cfg, dataset)
    check_methods(methods, net, cfg, normalizer(_batch(dataset, indices[:1])[0]))
    net.to(session.device)
    images, labels = _batch(dataset, indices)
    inputs = normalizer(images.to(session.device))
    labels = labels.to(session.device)
    layers = (check_layers(net, [n.strip() for n in cfg.randomise.split(",") if n.strip()])
              if cfg.randomise is not None else cascade_layers(net, inputs[:1]))
    run = open_run(cfg, "attribution sanity", default_out("attribution", "sanity", stem),
                   session)
    results = {m: _cached(run, m, indices) for m in methods}
    todo = [m for m in methods if results[m] is None]
    per_method = len(indices) * (cfg.repeats + len(layers))
    session.say(
        f"{name}: {len(methods)} methods ({len(todo)} to do) × {len(indices)} images × "
        f"({cfg.repeats} runs + {len(layers)} randomised steps: {' → '.join(layers)}) = "
        f"{per_method * len(todo):,} heatmaps to compute"
        + (f"; IBA {cfg.steps} steps × {cfg.iba_batch} samples each, statistics re-estimated "
           f"({n_samples(cfg):,} images at most) once the bottleneck's input changes"
           if "iba" in todo else ""))
    stats = (_statistics(cfg, net, bundle, normalizer, session, run.file("statistics.pt"))
             if "iba" in todo else None)
    for method in todo:
        attribute = (_iba(cfg, net, stats, bundle, normalizer, session, run, inputs[:1])
                     if method == "iba" else _baseline(method, cfg))
        result = cascading_randomisation(net, attribute, inputs, labels, layers=layers,
                                         seed=cfg.seed, repeats=cfg.repeats,
                                         batch_size=1 if method == "iba" else 8,
                                         progress=cfg.progress, description=method)
        result.meta = {"method": method, "indices": indices}
        result.save(run.file(f"sanity_{method}.pt"))
        results[method] = result
    table = _write_results(run, {m: results[m] for m in methods},
                           subject=f"{name}, {len(indices)} images")
    session.say(table)
    session.say(f"→ {run.file('sanity.csv')}, {run.file('sanity.md')}, {run.file('sanity.png')}")
    return 0


def _write_results(run: RunDir, results: dict[str, RandomisationResult],
                   subject: str | None = None) -> str:
    """Write sanity.csv, sanity.md and sanity.png (only what changed); return the table."""
    import csv
    import io

    from narrows.plotting import pyplot

    rows = [{"method": method, **row} for method, result in results.items()
            for row in result.to_rows()]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)

    def cell(mean: float, std: float) -> str:
        if math.isnan(mean):
            return "–"
        return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")

    lines = ["| method | randomised down to | Spearman ρ | SSIM | images |",
             "|---|---|---|---|---|"]
    for row in rows:
        where = row["randomised_to"] or "none (run-to-run)"
        lines.append(f"| {row['method']} | {where} | {cell(row['spearman_mean'], row['spearman_std'])}"
                     f" | {cell(row['ssim_mean'], row['ssim_std'])} | {row['n_images']} |")
    table = "\n".join(lines) + "\n"
    csv_text = text.getvalue()
    unchanged = (run.exists("sanity.csv") and run.file("sanity.csv").read_text() == csv_text
                 and run.exists("sanity.md") and run.exists("sanity.png"))
    if unchanged:
        return table
    run.write_text("sanity.csv", csv_text)
    run.write_text("sanity.md", table)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for index, (method, result) in enumerate(results.items()):
        result.plot(axes, label=method, color=f"C{index % 10}")
    fig.suptitle("cascading randomisation: original vs randomised heatmaps"
                 + (f"\n{subject}" if subject else ""), fontsize=10)
    fig.tight_layout()
    run.save_figure("sanity.png", fig)
    plt.close(fig)
    return table


register(Command(
    words=("attribution", "sanity"),
    summary="model-parameter randomisation check: do the heatmaps depend on the weights?",
    description="Cascading randomisation (Adebayo et al. 2018): re-initialise the model from "
    "the top layer down, one layer more per step, and compare each method's heatmaps with the "
    "original ones by Spearman rank correlation and SSIM (per image, mean ± std). --repeats runs "
    "on the unmodified model give the run-to-run noise floor (IBA is stochastic). Writes "
    "sanity.csv, sanity.md and sanity.png and prints the table; each method's result is cached "
    "(sanity_<method>.pt), so a rerun skips finished methods. IBA gets statistics re-estimated "
    "on the randomised model once the layers feeding its bottleneck are re-initialised.",
    config=SanityConfig,
    target="narrows.cli.attribution_sanity:execute_sanity",
    epilog="example:\n  narrows attribution sanity --checkpoint best.pt --methods "
    "iba,saliency,gradcam --images 16 --repeats 3",
))
