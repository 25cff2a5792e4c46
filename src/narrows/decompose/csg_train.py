"""Train a network with class-specific gates (the CSG baseline) on the core training loop and
save what ``decompose essential`` and ``mutual-info`` compare: ``csg.pt`` (network and gate),
``indices_csg.json`` (each class's top-k gates), ``gate.png`` and a flat ``results.json``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from narrows.decompose.options import CSGTrainOptions
from narrows.errors import UserError

GATE_OPTIONS = ("schedule", "period", "csg_epochs", "warmup", "lam_ce", "lam_l1",
                "target_density", "clip", "gate_init")


@dataclass(frozen=True)
class CSGOptions:
    """The CSG part of a run (the training settings are a :class:`TrainSettings`)."""

    schedule: str = CSGTrainOptions.schedule
    period: int = CSGTrainOptions.period
    csg_epochs: int = CSGTrainOptions.csg_epochs
    warmup: int = CSGTrainOptions.warmup
    lam_ce: float = CSGTrainOptions.lam_ce
    lam_l1: float = CSGTrainOptions.lam_l1
    target_density: float = CSGTrainOptions.target_density
    clip: str = CSGTrainOptions.clip
    gate_init: float = CSGTrainOptions.gate_init
    k: int = CSGTrainOptions.k

    def check(self) -> None:
        if self.csg_epochs > self.period:
            raise UserError(f"--csg-epochs {self.csg_epochs} is more than --period "
                            f"{self.period}", "use --csg-epochs <= --period")


def csg_options(options: CSGTrainOptions | None = None, **overrides: Any) -> CSGOptions:
    """The :class:`CSGOptions` of ``options`` (a :class:`CSGTrainOptions`, or anything with
    its fields, such as the command's config; default: those of ``narrows decompose
    csg-train``), with ``overrides`` by field name; not checked yet (:meth:`CSGOptions.check`)."""
    source = CSGTrainOptions() if options is None else options
    values = {name: getattr(source, name) for name in (*GATE_OPTIONS, "k")}
    return CSGOptions(**{**values, **overrides})


def train_csg(model: Any, card: Any, data: Any, settings: Any,
              options: CSGOptions | CSGTrainOptions | None = None, *,
              run: Any, device: Any, dist: Any = None, progress: bool = True,
              say: Callable[..., None] = print, threads: int | None = None,
              spec: str | None = None) -> dict[str, Any]:
    """Gate ``model`` (built for ``data`` with its ``card``), train it with the CSG loss by
    :func:`narrows.training.fit` into ``run`` (resuming there) and save the gate, the top-k
    indices and the figure; returns the flat summary also written to ``results.json``.
    ``settings``: the :class:`~narrows.training.TrainSettings`; ``spec``: the data spec
    recorded (default: ``data``'s). ``options``: a :class:`CSGOptions`, or a
    :class:`CSGTrainOptions` read by :func:`csg_options` (default: those of ``narrows
    decompose csg-train``)."""
    from narrows.decompose.csg import Alternate, CSGLoss, CSGNetwork, csg_topk, density, save_csg
    from narrows.runtime import Distributed
    from narrows.training import fit

    if not isinstance(options, CSGOptions):
        options = csg_options(options)
    options.check()
    dist = dist or Distributed()
    if dist.enabled:
        raise UserError("csg-train runs in one process (the gate is unused in ordinary "
                        "epochs, which DDP does not allow)", "run it without torchrun")
    network = CSGNetwork(model, init=options.gate_init)
    classes, width = network.num_classes, network.num_channels
    if options.k > width:
        raise UserError(f"--k {options.k} is more than the {width} channels", "lower --k")
    loss = CSGLoss(network, schedule=options.schedule,
                   alternate=Alternate(options.period, options.csg_epochs, options.warmup),
                   lam_ce=options.lam_ce, lam_l1=options.lam_l1,
                   target_density=options.target_density, clip=options.clip,
                   label_smoothing=settings.label_smoothing)
    spec = spec or data.info.spec
    csg_epochs = [e + 1 for e in range(settings.epochs) if loss.csg_epoch(e)]
    say(f"CSG training of {card.architecture} ({classes} classes × {width} gates) on "
        f"{spec}: {settings.epochs} epochs × {len(data.train()):,} images; CSG-path epochs: "
        + (", ".join(map(str, csg_epochs)) if options.schedule == "alternate" else "all (joint)")
        + f"; {device}" + (f", {threads} threads" if threads else "") + f" → {run.path}")
    result = fit(network, data, settings, card=card, device=device, run=run, dist=dist,
                 progress=progress, log=say, loss_fn=loss)
    gate = network.project_(options.clip).detach().cpu()
    recorded = {k: getattr(options, k) for k in GATE_OPTIONS}
    save_csg(run.file("csg.pt"), network, card,
             {**recorded, "epochs": settings.epochs, "seed": settings.seed})
    indices = csg_topk(gate, options.k)
    indices.meta.update(model=card.architecture, data=spec, checkpoint=str(run.file("csg.pt")))
    indices.save(run.file("indices_csg.json"))
    _draw_gate(run, gate, result.metrics, data.info.class_names)
    line = (f"{result.summary()}; gate density {density(gate):.3f}, top-{options.k} gates in "
            f"{run.file('indices_csg.json')}")
    summary = {"summary": line, "model": card.architecture, "data": spec, "epochs": result.epochs,
               "std_top1": result.final.top1 if result.final else None,
               "best_top1": result.best_top1, "gate_density": density(gate),
               "csg": str(run.file("csg.pt")), "indices": str(run.file("indices_csg.json"))}
    run.write_json("results.json", summary)
    return summary


def _draw_gate(run: Any, gate: Any, rows: list[dict[str, Any]], class_names: Any = None) -> None:
    """gate.png: the gate matrix and its density per epoch."""
    from narrows.decompose.csg import plot_gate

    fig, _ = plot_gate(gate, rows, class_names)
    run.save_figure("gate.png", fig)
