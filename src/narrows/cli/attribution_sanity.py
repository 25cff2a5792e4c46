"""``narrows attribution sanity``: the cascading model-parameter randomisation check."""

from __future__ import annotations

from dataclasses import replace

from narrows.attribution.options import IBAOptions, ImageChoice, SanityOptions, StatisticsOptions
from narrows.cli.app import command
from narrows.cli.attribution import LayerSubject, checked_images, statistics, subject
from narrows.config import compose
from narrows.runs.session import CommonOptions, start

SanityConfig = compose("SanityConfig", SanityOptions, ImageChoice, IBAOptions, StatisticsOptions,
                       LayerSubject, CommonOptions)


def execute_sanity(cfg: SanityConfig) -> int:
    from narrows.attribution.images import image_batch
    from narrows.attribution.methods import parse_names
    from narrows.attribution.metrics import cascade_layers
    from narrows.attribution.metrics.randomisation import check_layers
    from narrows.attribution.sanity import sanity_check

    methods = parse_names(cfg.methods)
    session = start(cfg)
    net, bundle, normalizer, name, stem = subject(cfg)
    dataset = bundle.split("test")
    indices, _ = checked_images(cfg, methods, net, dataset, normalizer)
    net.to(session.device)
    images, labels = image_batch(dataset, indices)
    inputs = normalizer(images.to(session.device))
    labels = labels.to(session.device)
    layers = (check_layers(net, [n.strip() for n in cfg.randomise.split(",") if n.strip()])
              if cfg.randomise is not None else cascade_layers(net, inputs[:1]))
    run = session.open(cfg, "attribution sanity", "attribution", "sanity", stem)
    fresh = replace(cfg, statistics=None)
    result = sanity_check(
        net, inputs, labels, indices, methods, layers, run, options=cfg,
        statistics=lambda: statistics(cfg, net, bundle, normalizer, session,
                                      run.file("statistics.pt")),
        estimate=lambda model, path: statistics(fresh, model, bundle, normalizer, session,
                                                path, re_estimate=True),
        progress=cfg.progress, name=name, n_samples=cfg.n_samples,
        log=session.say)
    session.say(result.table)
    session.say("→ " + ", ".join(str(f) for f in result.files))
    return 0


command(
    "attribution sanity", SanityConfig, execute_sanity,
    summary="model-parameter randomisation check: do the heatmaps depend on the weights?",
    description="Cascading randomisation (Adebayo et al. 2018): re-initialise the model from "
    "the top layer down, one layer more per step, and compare each method's heatmaps with the "
    "original ones by Spearman rank correlation and SSIM (per image, mean ± std). --repeats runs "
    "on the unmodified model give the run-to-run noise floor (IBA is stochastic). Writes "
    "sanity.csv, sanity.md and sanity.png and prints the table; each method's result is cached "
    "(sanity_<method>.pt), so a rerun skips finished methods. IBA gets statistics re-estimated "
    "on the randomised model once the layers feeding its bottleneck are re-initialised.",
    epilog="example:\n  narrows attribution sanity --checkpoint best.pt --methods "
    "iba,saliency,gradcam --images 16 --repeats 3")
