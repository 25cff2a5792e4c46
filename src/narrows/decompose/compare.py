"""Comparing index sets on their models: ours (an indices file of a model) and CSG gates.

:func:`essential_sets` gathers the (model, index set) pairs to test; :func:`essential_comparison`
runs the essential-features noise test on each, reusing a per-model cache
(``essential_<name>.json``), and returns an :class:`EssentialComparison`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from narrows.decompose.csg import csg_orders, csg_topk, load_csg_subject
from narrows.decompose.essential import (
    CONDITIONS,
    EssentialResult,
    essential_markdown,
    plot_results,
)
from narrows.decompose.indices import ClassIndices
from narrows.decompose.options import EssentialOptions
from narrows.decompose.rules import load_indices
from narrows.decompose.tables import csv_text
from narrows.errors import UserError


@dataclass
class Tested:
    """One model with one index set to test: ``name`` is its column/key in the results."""

    name: str
    model: Any
    indices: ClassIndices
    bundle: Any
    normalizer: Any
    description: str


def essential_sets(options: EssentialOptions | None = None, *, subject: Any = None,
                   data: str | None = None, model_name: str | None = None,
                   image_size: int | None = None, k_name: str = "k",
                   **overrides: Any) -> list[Tested]:
    """``ours`` (``subject``, a loaded :class:`~narrows.models.subject.Subject`, with the first
    ``k`` ids of the indices file ``indices``) and the CSG network of ``csg_checkpoint`` with its
    ``csg_k`` gates per class in each order of ``csg_order`` (on ``data``, else ours' data).

    Those five are fields of ``options`` (default: those of ``narrows decompose essential``),
    each replaced by a keyword argument of its name in ``overrides``. ``model_name`` (the
    architecture, for a CSG checkpoint without a card) and ``image_size`` go to
    :func:`load_csg_subject`; ``k_name`` is what messages call ``k``. Returns one
    :class:`Tested` per model and index set."""
    opts = replace(EssentialOptions() if options is None else options, **overrides)
    indices, k, csg_checkpoint = opts.indices, opts.k, opts.csg_checkpoint
    csg_k, csg_order = opts.csg_k, opts.csg_order
    from narrows.training import Normalizer

    if not indices and not csg_checkpoint:
        raise UserError("nothing to test", "pass indices (with subject) and/or csg_checkpoint")
    if indices and subject is None:
        raise UserError("indices need the model they were extracted from", "pass subject")
    tested: list[Tested] = []
    if indices:
        chosen = load_indices(indices, subject.model, k, k_name)
        tested.append(Tested("ours", subject.model, chosen, subject.bundle,
                             Normalizer(subject.mean, subject.std),
                             f"{subject.name} with {indices}"))
        data = data or subject.bundle.info.spec
    if csg_checkpoint:
        loaded, bundle, normalizer = load_csg_subject(csg_checkpoint, name=model_name, data=data,
                                                      image_size=image_size)
        for name, order in csg_orders(csg_order):
            tested.append(Tested(name, loaded.model, csg_topk(loaded.gate, csg_k, order),
                                 bundle, normalizer,
                                 f"CSG {csg_checkpoint}, {order} {csg_k} gates"))
    return tested


@dataclass
class EssentialComparison:
    """The essential-features result of each tested model, by name (``ours``, ``csg``...)."""

    results: dict[str, EssentialResult]

    @property
    def level(self) -> float:
        """The σ of the upstream-schema file (1 when tested, else the first)."""
        first = next(iter(self.results.values()))
        return first.sigmas[first.level()]

    def table(self) -> str:
        """The Markdown table of ``essential.md``."""
        return essential_markdown(self.results)

    def to_rows(self) -> list[dict[str, Any]]:
        """Flat records (one per model, σ, class) for CSV and pandas."""
        return [{"model": name, **row} for name, r in self.results.items()
                for row in r.to_rows()]

    def summary(self) -> str:
        """One line: per model, the fractions still correct at :attr:`level`."""
        parts = []
        for name, r in self.results.items():
            lv, rates = r.level(self.level), r.rates()
            parts.append(f"{name} clean {100 * rates['clean'][lv]:.1f}% / I_c "
                         f"{100 * rates['inf'][lv]:.1f}% / others {100 * rates['noninf'][lv]:.1f}%"
                         f" / random {100 * rates['random'][lv]:.1f}%")
        return f"still correct at σ = {self.level:g}: " + "; ".join(parts)

    def headline(self) -> dict[str, float | None]:
        """The flat numbers of ``results.json``, per model (index set): the clean accuracy
        (``"<name>.clean"``) and, at each noise level σ, how much accuracy noise on the
        informative channels, the others and random ones takes away (``"<name>.drop_inf@<σ>"``,
        ``drop_noninf``, ``drop_random``: clean rate minus noisy rate; None without images)."""
        found: dict[str, float | None] = {}
        for name, result in self.results.items():
            if int(result.images.sum()) == 0:
                found[f"{name}.clean"] = None
                continue
            rates = result.rates()
            found[f"{name}.clean"] = rates["clean"][0]
            for lv, sigma in enumerate(result.sigmas):
                for condition in CONDITIONS:
                    found[f"{name}.drop_{condition}@{sigma:g}"] = (
                        rates["clean"][lv] - rates[condition][lv])
        return found

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """One panel per model; ``ax``: one axes per model (a sequence), or one axes for a
        single model; None makes the figure. Returns ``(fig, axes)``."""
        if ax is None:
            return plot_results(self.results)
        axes = list(ax) if hasattr(ax, "__len__") else [ax]
        if len(axes) != len(self.results):
            raise UserError(f"{len(self.results)} models need {len(self.results)} axes, "
                            f"got {len(axes)}", "pass one axes per model, or none")
        for one, (name, result) in zip(axes, self.results.items(), strict=True):
            result.plot(ax=one, title=name)
        return axes[0].figure, ax

    @classmethod
    def load(cls, path: str | Path) -> EssentialComparison:
        """Read the directory :meth:`save` wrote: the models named in
        ``results_essential_features.json``, each from its ``essential_<name>.json``."""
        from narrows.runs.files import read_json_file

        path = Path(path)
        names = read_json_file(path / "results_essential_features.json",
                               "essential-features results file",
                               "run 'narrows decompose essential' again", kind=dict)
        missing = [n for n in names if not (path / f"essential_{n}.json").is_file()]
        if missing:
            raise UserError(f"{path} has no essential_{missing[0]}.json",
                            "run 'narrows decompose essential' again on this --out")
        return cls({n: EssentialResult.load(path / f"essential_{n}.json") for n in names})

    def save(self, run: Any, *, command: str = "decompose essential") -> None:
        """``results_essential_features.json`` (upstream schema at :attr:`level`),
        ``essential.csv``/``.md``, ``essential.png`` and the flat ``results.json``
        (:func:`~narrows.runs.results.flat_summary`, naming ``command``) into ``run`` (a
        RunDir); given a directory path instead, also each model's ``essential_<name>.json``
        (which a run keeps as its cache), so that :meth:`load` can read it back."""
        from narrows.decompose.saving import as_run
        from narrows.plotting import pyplot

        if not hasattr(run, "write_json"):
            run = as_run(run)
            for name, result in self.results.items():
                result.save(run.file(f"essential_{name}.json"))
        level = self.level
        run.write_json("results_essential_features.json",
                       {name: r.to_upstream(level) for name, r in self.results.items()})
        run.write_text("essential.csv", csv_text(self.to_rows()))
        run.write_text("essential.md", self.table())
        fig, _ = plot_results(self.results)
        run.save_figure("essential.png", fig)
        pyplot().close(fig)
        from narrows.runs.results import flat_summary

        run.write_json("results.json", flat_summary(self, command=command))


def essential_comparison(tested: Sequence[Tested], options: EssentialOptions | None = None, *,
                         seed: int = 0, device: Any = "cpu", progress: bool = False,
                         cache_dir: str | Path | None = None,
                         say: Callable[[str], None] = print,
                         **overrides: Any) -> EssentialComparison:
    """The essential-features test of each of ``tested`` on the plain ``split`` (first
    ``images``); each result is kept in ``cache_dir/essential_<name>.json`` and reused while
    its index lists are unchanged.

    The options are ``options`` (default: those of ``narrows decompose essential``) with
    ``overrides`` by field name of :class:`EssentialOptions` (``sigma=``, also spelt
    ``sigmas=``, ``mode=``, ``split=``, ``images=``, ``batch_size=``)."""
    if "sigmas" in overrides:
        overrides["sigma"] = overrides.pop("sigmas")
    opts = replace(EssentialOptions() if options is None else options, **overrides)
    sigmas, mode, split, images = opts.sigma, opts.mode, opts.split, opts.images
    batch_size = opts.batch_size
    from narrows.decompose.essential import essential_features  # looked up at call time

    results: dict[str, EssentialResult] = {}
    for item in tested:
        data = item.bundle.split(split, "none")
        n = len(data) if images is None else min(images, len(data))
        cache = Path(cache_dir) / f"essential_{item.name}.json" if cache_dir is not None else None
        lists = [list(r) for r in item.indices.indices]
        if cache is not None and cache.is_file():
            saved = EssentialResult.load(cache)
            if saved.meta.get("index_lists") == lists:
                results[item.name] = saved
                say(f"{item.name}: reusing {cache}")
                continue
        say(f"{item.name}: {item.description}; {n:,} {split} images → {n:,} backbone "
            f"forwards + {n * len(sigmas) * 3:,} head evaluations ({len(sigmas)} "
            f"levels × 3 conditions), {mode} noise")
        result = essential_features(
            item.model, data, item.indices, sigmas=list(sigmas), mode=mode, seed=seed,
            normalizer=item.normalizer, device=device, batch_size=batch_size,
            limit=images, progress=progress)
        result.meta.update(model=item.description, split=split, index_lists=lists,
                           class_names=list(item.bundle.info.class_names))
        if cache is not None:
            result.save(cache)
        results[item.name] = result
    return EssentialComparison(results)
