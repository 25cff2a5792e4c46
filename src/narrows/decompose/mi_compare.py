"""Pairwise MI of index sets over k, for indices files and CSG gates, and the models' MIS.

:func:`mutual_info_comparison` resolves the feature width D and the k values, builds one index
source per set (``ours``: indices files; ``csg``/``csg-upstream``: gates), scores them with
:func:`~narrows.decompose.mutual_info.mi_table` and, with ``mis``, each model's MIS (cached per
model in ``mis_<name>.json`` of the run). The result is a :class:`MIComparison`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from narrows.decompose.csg import LoadedCSG, csg_orders, csg_topk
from narrows.decompose.indices import ClassIndices
from narrows.decompose.options import MutualInfoOptions
from narrows.decompose.rules import head_shape
from narrows.decompose.tables import csv_text, markdown
from narrows.errors import UserError


def resolve_width(channels: int | None, model: Any = None, csg_model: Any = None) -> int | None:
    """The feature width D: ``channels`` (checked against the models), else the models'
    (which must agree); None when neither is known."""
    widths = {}
    if model is not None:
        widths["the subject's model"] = head_shape(model)[1]
    if csg_model is not None:
        widths["the CSG network"] = head_shape(csg_model)[1]
    if channels is not None:
        for where, d in widths.items():
            if d != channels:
                raise UserError(f"channels = {channels} but {where} has {d} channels",
                                "drop channels")
        return channels
    if len(set(widths.values())) > 1:
        raise UserError(f"the two models have different widths ({widths})",
                        "compare models with the same last feature layer")
    return next(iter(widths.values()), None)


def recorded_width(paths: Sequence[str | Path]) -> int:
    """The feature width recorded in the (narrows-form) indices files; one, or an error."""
    widths = set()
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # ClassIndices.load reports unreadable files
        if (isinstance(data, dict) and isinstance(data.get("num_channels"), int)
                and not isinstance(data["num_channels"], bool)):
            widths.add(data["num_channels"])
    if len(widths) != 1:
        raise UserError("the feature width D, which MI depends on, is not known"
                        + (f" (the files disagree: {sorted(widths)})" if widths else
                           " (upstream-form indices files do not record it)"),
                        "pass channels (D), or a model")
    return widths.pop()


def file_source(files: list[ClassIndices], names: Sequence[str]) -> Callable[[int], ClassIndices]:
    """``k -> ClassIndices``: the file with exactly ``k`` ids per class, else the first ``k`` ids
    of the shortest file with more."""
    def pick(k: int) -> ClassIndices:
        exact = [f for f in files if f.k == k]
        if exact:
            return exact[0]
        longer = sorted((f for f in files if min(len(r) for r in f.indices) >= k),
                        key=lambda f: min(len(r) for r in f.indices))
        if not longer:
            raise UserError(f"no indices file has {k} ids for every class ({', '.join(names)})",
                            "pass a file extracted with that k, or smaller ks")
        return longer[0].top(k)

    return pick


def _ks(ks: Sequence[int] | None, files: list[ClassIndices], width: int) -> list[int]:
    if ks:
        chosen = list(ks)
    elif files:
        chosen = sorted({f.k if f.k is not None else min(len(r) for r in f.indices)
                         for f in files})
    else:
        chosen = [k for k in (5, 10, 20) if k <= width]
    too_wide = [k for k in chosen if k > width]
    if too_wide:
        raise UserError(f"k = {too_wide[0]} is more than the {width} channels", "lower ks")
    return chosen


@dataclass
class MIComparison:
    """The MI table of every source and k, and (optionally) each model's MIS summary."""

    table: Any  # narrows.decompose.mutual_info.MITable
    mis: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``mutual_info.json`` document."""
        doc = self.table.to_json()
        if self.mis:
            doc["mis"] = self.mis
        return doc

    def markdown(self) -> str:
        """The ``mutual_info.md`` text: one table per score, then MIS."""
        from narrows.decompose.mutual_info import LABELS, SCORES

        parts = [f"### {LABELS[s]}\n\n" + self.table.to_markdown(s) for s in SCORES]
        if self.mis:
            parts.append("### MIS (higher: more class-specific channels)\n\n" + markdown(
                ["model", "MIS", "images"], [[n, f"{v['mis']:.4f}", str(v["images"])]
                                             for n, v in self.mis.items()]))
        return "\n".join(parts)

    def to_rows(self) -> list[dict[str, Any]]:
        """Flat records: the table's rows (``k``, ``source`` and each score)."""
        return self.table.to_rows()

    def summary(self) -> str:
        """One line: the table's summary, then each model's MIS."""
        line = self.table.summary()
        if self.mis:
            line += "; MIS " + ", ".join(f"{n} {v['mis']:.4f}" for n, v in self.mis.items())
        return line

    def headline(self) -> dict[str, float | None]:
        """The flat numbers of ``results.json``: each source's mean pairwise MI at each k,
        with the diagonal as upstream (``"<source>.mi@<k>"``) and without it
        (``"<source>.mi_no_diagonal@<k>"``), and each model's MIS (``"<model>.mis"``)."""
        found: dict[str, float | None] = {}
        for source, by_k in self.table.scores.items():
            for k in self.table.ks:
                if k in by_k:
                    found[f"{source}.mi@{k}"] = by_k[k].get("upstream")
                    found[f"{source}.mi_no_diagonal@{k}"] = by_k[k].get("no_diagonal")
        for name, value in self.mis.items():
            found[f"{name}.mis"] = value.get("mis")
        return found

    def plot(self, ax: Any = None, diagonal: bool = True) -> tuple[Any, Any]:
        """The upstream score (or without ``diagonal`` the corrected one) against k."""
        return self.table.plot("upstream" if diagonal else "no_diagonal", ax=ax)

    @classmethod
    def load(cls, path: str | Path) -> MIComparison:
        """Read ``mutual_info.json`` (``path``: the file or the directory :meth:`save` wrote)."""
        from narrows.decompose.mutual_info import MITable
        from narrows.runs.files import reading
        from narrows.runs.results import read_result_json

        what, fix = "mutual-information results file", "run 'narrows decompose mutual-info' again"
        data = read_result_json(path, "decompose.mutual_info", 1, what, fix,
                                file_name="mutual_info.json", required_keys=("ks", "scores"))
        with reading(path, what, fix):
            return cls(MITable.from_json(data), dict(data.get("mis", {})))

    def save(self, run: Any, diagonal: bool = True, *,
             command: str = "decompose mutual-info") -> None:
        """``mutual_info.json`` (after the header)/``.csv``/``.md``, ``mutual_info.png`` (the
        upstream score, or without ``diagonal`` the corrected one) and the flat
        ``results.json`` (:func:`~narrows.runs.results.flat_summary`, naming ``command``) into
        ``run`` (a RunDir, or a directory path)."""
        from narrows.decompose.saving import as_run, decompose_header
        from narrows.plotting import pyplot

        run = as_run(run)
        seed = self.table.meta.get("seed")
        run.write_json("mutual_info.json",
                       {**decompose_header("mutual_info", self.table.meta, seed),
                        **self.to_json()})
        run.write_text("mutual_info.csv", csv_text(self.table.to_rows()))
        run.write_text("mutual_info.md", self.markdown())
        fig, _ = self.table.plot("upstream" if diagonal else "no_diagonal")
        run.save_figure("mutual_info.png", fig)
        pyplot().close(fig)
        from narrows.runs.results import flat_summary

        run.write_json("results.json", flat_summary(self, command=command))


def mutual_info_comparison(
    options: MutualInfoOptions | None = None, *, subject: Any = None,
    csg: tuple[LoadedCSG, Any, Any] | None = None, seed: int = 0,
    mis_models: Sequence[str] = ("ours", "csg"), device: Any = "cpu", progress: bool = False,
    run: Any = None, say: Callable[[str], None] = print, **overrides: Any,
) -> MIComparison:
    """Pairwise MI of the index sets of the ``indices`` files (``ours``) and of the CSG gates
    (``csg``: ``load_csg_subject(csg_checkpoint)``) for each k (default: each file's k, else 5
    10 20) and ``random_draws`` random sets; with ``mis``, the MIS of ``subject``'s model
    (``ours``) and of the CSG network (``csg``), those named in ``mis_models``, on their test
    images (cached in ``run``).

    The options are ``options`` (default: those of ``narrows decompose mutual-info``) with
    ``overrides`` by field name of :class:`MutualInfoOptions` (``indices=``,
    ``csg_checkpoint=``, ``csg_order=``, ``ks=``, ``channels=``, ``random_draws=``, ``mis=``,
    ``images=``, ``batch_size=``; ``csg_k`` and ``diagonal`` are not used here)."""
    from narrows.decompose.mutual_info import mi_table

    opts = replace(MutualInfoOptions() if options is None else options, **overrides)
    indices, csg_checkpoint, csg_order = opts.indices, opts.csg_checkpoint, opts.csg_order
    ks, channels, random_draws, mis = opts.ks, opts.channels, opts.random_draws, opts.mis
    images, batch_size = opts.images, opts.batch_size

    if not indices and csg is None:
        raise UserError("no index sets given", "pass indices and/or csg")
    loaded = csg[0] if csg is not None else None
    width = resolve_width(channels, subject.model if subject else None,
                          loaded.model if loaded else None)
    if width is None:
        width = recorded_width(indices)
    classes = head_shape(subject.model)[0] if subject else (
        head_shape(loaded.model)[0] if loaded else None)
    files = [ClassIndices.load(p, num_classes=classes, num_channels=width) for p in indices]
    if len({f.num_classes for f in files}) > 1:
        raise UserError("the indices files are for different numbers of classes",
                        "give files of one model")
    chosen = _ks(ks, files, width)
    sources = {}
    if files:
        sources["ours"] = file_source(files, list(indices))
    if loaded is not None:
        for name, order in csg_orders(csg_order):
            sources[name] = lambda k, o=order: csg_topk(loaded.gate, k, o)
    num_classes = classes or (files[0].num_classes if files else None)
    say(f"pairwise MI of index sets: {len(sources)} sources × {len(chosen)} k "
        f"({', '.join(map(str, chosen))}), D = {width}"
        + (f", random: mean of {random_draws} draws" if random_draws else ""))
    table = mi_table(sources, chosen, random_draws=random_draws, num_classes=num_classes,
                     num_channels=width, seed=seed)
    table.meta.update(channels=width, indices=list(indices), csg_checkpoint=csg_checkpoint,
                      csg_order=csg_order)
    scores = mis_scores(subject, csg, which=mis_models, images=images, batch_size=batch_size, device=device,
                        progress=progress, run=run, say=say) if mis else {}
    return MIComparison(table, scores)


def mis_scores(subject: Any, csg: tuple[LoadedCSG, Any, Any] | None, *,
               which: Sequence[str] = ("ours", "csg"), images: int | None = None, batch_size: int = 128, device: Any = "cpu",
               progress: bool = False, run: Any = None,
               say: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """MIS of ``subject``'s model (``ours``) and of the CSG network (``csg``) on the first
    ``images`` test images (only the names in ``which``); each cached in ``mis_<name>.json`` of ``run`` (resumable). Returns
    ``{name: {"mis", "images", "file"}}``."""
    from narrows.decompose.mutual_info import mis, pooled_features
    from narrows.training import Normalizer

    models = []
    if subject is not None:
        models.append(("ours", subject.model, subject.bundle, Normalizer(subject.mean,
                                                                         subject.std)))
    if csg is not None:
        models.append(("csg", csg[0].model, csg[1], csg[2]))
    out = {}
    for name, model, data, norm in models:
        if name not in which:
            continue
        cache = run.file(f"mis_{name}.json") if run is not None else None
        if cache is not None and cache.is_file():
            out[name] = run.read_json(cache.name, required_keys=("mis", "images"))
            continue
        test = data.test()
        n = len(test) if images is None else min(images, len(test))
        classes, width = head_shape(model)
        say(f"MIS of {name}: {n:,} test images, {classes} × {width} kNN MI estimates")
        h, labels = pooled_features(model, test, normalizer=norm, device=device,
                                    batch_size=batch_size, limit=images, progress=progress)
        result = mis(h, labels, num_classes=classes)
        out[name] = {"mis": result.score, "images": result.images,
                     "matrix": result.matrix.tolist()}
        if run is not None:
            run.write_json(cache.name, out[name])
    return {n: {k: v for k, v in d.items() if k != "matrix"} | {"file": f"mis_{n}.json"}
            for n, d in out.items()}
