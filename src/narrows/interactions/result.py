"""The result of a multi-order interaction run: Δv per image, ratio, pair and context.

Derived quantities (spec §1.3): I = mean of Δv over contexts; A(r) = mean |I| over images and
pairs; J(r) = A(r) / normaliser, with ``normalize="sampled"`` (upstream: the mean of A over the
evaluated ratios) or ``"uniform"`` (the trapezoid integral of A over r ∈ [0, 1]). Standard errors
are jackknife estimates over images (for A this equals std/√N exactly; for J it includes the
normaliser's own noise).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from narrows.errors import UserError

Normalize = Literal["sampled", "uniform"]
COMPARISON = "comparison.json"  # the labels of an InteractionComparison, in order
FORMAT_KIND, FORMAT_VERSION = "interactions", 1  # meta.json's "format": narrows.interactions/1


@dataclass
class InteractionResult:
    dv: np.ndarray  # (images, ratios, pairs, contexts) float32
    pairs: np.ndarray  # (images, pairs, 2) int16
    ratios: tuple[float, ...]
    orders: tuple[int, ...]
    grid: int
    image_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- the estimates ---------------------------------------------------------------------
    @property
    def I(self) -> np.ndarray:  # noqa: E743 - the paper's name
        """I^(m)(i, j) per image, ratio and pair: the mean of Δv over the K contexts."""
        return self.dv.astype(np.float64).mean(axis=-1)

    def strength_per_image(self, debiased: bool = False) -> np.ndarray:
        """Mean |I| over pairs, per image and ratio ``(images, ratios)``.

        ``debiased`` (spec §8 A3) replaces |Î| by sqrt(max(0, Î² − s²/K)) with s² the sample
        variance of Δv over the K contexts, removing the noise floor of |mean| for small K.
        """
        dv = self.dv.astype(np.float64)
        i_hat = dv.mean(axis=-1)
        if not debiased:
            return np.abs(i_hat).mean(axis=-1)
        k = dv.shape[-1]
        var = dv.var(axis=-1, ddof=1) if k > 1 else np.zeros_like(i_hat)
        return np.sqrt(np.maximum(0.0, i_hat**2 - var / k)).mean(axis=-1)

    def A(self, debiased: bool = False) -> np.ndarray:
        """A(r): mean |I| over images and pairs (each pair weighs the same), per ratio."""
        return self.strength_per_image(debiased).mean(axis=0)

    def J(self, normalize: Normalize = "sampled", debiased: bool = False) -> np.ndarray:
        return _normalise(self.A(debiased), self.ratios, normalize)

    def stderr(self, what: Literal["A", "J"] = "J", normalize: Normalize = "sampled",
               debiased: bool = False) -> np.ndarray | None:
        """Jackknife standard error over images; ``None`` with fewer than two images (one image
        gives no standard error)."""
        per_image = self.strength_per_image(debiased)
        n = per_image.shape[0]
        if n < 2:
            return None
        loo = (per_image.sum(axis=0, keepdims=True) - per_image) / (n - 1)  # leave-one-out A
        if what == "J":
            loo = np.stack([_normalise(a, self.ratios, normalize) for a in loo])
        return np.sqrt((n - 1) / n * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))

    def degenerate(self) -> str | None:
        """Why J is undefined, or ``None``: when every Δv is 0 (the reward does not change when
        patches are masked) A is 0 at every order and J = A / normaliser is 0 / 0."""
        if self.dv.size == 0:
            return "no images were measured"
        if not np.any(self.dv):
            return "the model's output does not change when patches are masked (every Δv is 0)"
        return None

    def warning(self) -> str | None:
        """:meth:`degenerate` with its likely cause (recorded by the run), as one line."""
        reason = self.degenerate()
        if reason is None:
            return None
        cause = self.meta.get("constant_output_cause")
        return f"{reason}: {cause}" if cause else reason

    # -- tables ----------------------------------------------------------------------------
    def curve_rows(self) -> list[dict[str, float | None]]:
        """One row per ratio; values that are undefined (J of a degenerate run, standard
        errors of a single image) are ``None``."""
        a, a_se = self.A(), self.stderr("A")
        js, js_se = self.J("sampled"), self.stderr("J", "sampled")
        ju = self.J("uniform")
        jd = self.J("sampled", debiased=True)

        def at(values: np.ndarray | None, k: int) -> float | None:
            if values is None or not np.isfinite(values[k]):
                return None
            return float(values[k])

        return [
            {"ratio": r, "order": m, "A": at(a, k), "A_stderr": at(a_se, k),
             "J_sampled": at(js, k), "J_sampled_stderr": at(js_se, k),
             "J_uniform": at(ju, k), "J_sampled_debiased": at(jd, k)}
            for k, (r, m) in enumerate(zip(self.ratios, self.orders, strict=True))
        ]

    def to_rows(self) -> list[dict[str, float | None]]:
        """Flat records for CSV and pandas: :meth:`curve_rows`."""
        return self.curve_rows()

    def summary(self) -> str:
        """One line: J (sampled) per ratio, or why there is no curve."""
        warning = self.warning()
        if warning:
            return f"no curve: {warning}"
        return "J (sampled): " + " ".join(f"{r:g}:{v:.2f}" for r, v in
                                          zip(self.ratios, self.J(), strict=True))

    def headline(self) -> dict[str, float | int | None]:
        """The flat numbers of ``results.json``: ``images`` and J (sampled) at each ratio r as
        ``"J@<r>"`` (NaN where J is undefined, see :meth:`degenerate`; None in results.json)."""
        return {"images": int(self.dv.shape[0]),
                **{f"J@{r:g}": float(v) for r, v in zip(self.ratios, self.J(), strict=True)}}

    def curve_csv(self) -> str:
        """``curve_rows`` as CSV; an undefined value is an empty cell."""
        rows = self.curve_rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
        return buffer.getvalue()

    # -- files -----------------------------------------------------------------------------
    def save(self, directory: str | Path, *, figure: bool = True) -> Path:
        """Write ``dv.npy``, ``pairs.npy``, ``meta.json``, ``curve.csv`` (and ``curve.png``)."""
        from narrows.runs.files import atomic_write, atomic_write_json, atomic_write_text

        directory = Path(directory)
        atomic_write(directory / "dv.npy", lambda fh: np.save(fh, self.dv.astype(np.float32)))
        atomic_write(directory / "pairs.npy", lambda fh: np.save(fh, self.pairs.astype(np.int16)))
        atomic_write_json(directory / "meta.json", self.meta_document())
        atomic_write_text(directory / "curve.csv", self.curve_csv())
        if figure:
            from narrows.plotting import pyplot
            from narrows.runs.files import atomic_savefig

            fig, _ = self.plot()
            atomic_savefig(directory / "curve.png", fig, dpi=120, bbox_inches="tight")
            pyplot().close(fig)
        return directory

    def meta_document(self) -> dict[str, Any]:
        n = int(self.dv.shape[0])
        notes = {"standard_errors": (f"jackknife over {n} images" if n > 1 else
                                     f"none: {n} image{'s' if n != 1 else ''}"),
                 "warning": self.warning()}
        from narrows.runs.results import header, provenance

        origin = provenance(model=self.meta.get("model"), data=self.meta.get("data"),
                            seed=self.meta.get("seed"))
        return {**header(FORMAT_KIND, FORMAT_VERSION, origin), **self.meta, **notes,
                "ratios": list(self.ratios), "orders": list(self.orders),
                "grid": self.grid, "image_ids": list(self.image_ids), "labels": list(self.labels),
                "shape": {"images": int(self.dv.shape[0]), "ratios": int(self.dv.shape[1]),
                          "pairs": int(self.dv.shape[2]), "contexts": int(self.dv.shape[3])}}

    @classmethod
    def load(cls, directory: str | Path) -> InteractionResult:
        directory = Path(directory)
        missing = [f for f in ("dv.npy", "pairs.npy", "meta.json") if not (directory / f).is_file()]
        if missing:
            raise UserError(f"{directory} is not a finished interactions run (no {missing[0]})",
                            "give the --out directory of a finished 'narrows interactions run'")
        from narrows.runs.files import read_json_file, read_npy, reading

        fix = "delete it and rerun 'narrows interactions run' on this --out (or pass --overwrite)"
        meta = read_json_file(directory / "meta.json", "interactions meta file", fix,
                              required_keys=("ratios", "orders", "grid", "image_ids", "labels"))
        dv = read_npy(directory / "dv.npy", "interactions result array", fix)
        pairs = read_npy(directory / "pairs.npy", "interactions pairs array", fix)
        from narrows.runs.results import check_header

        check_header(meta, FORMAT_KIND, FORMAT_VERSION, str(directory / "meta.json"))
        with reading(directory / "meta.json", "interactions meta file", fix):
            ratios, orders = tuple(meta.pop("ratios")), tuple(meta.pop("orders"))
            grid, image_ids = int(meta.pop("grid")), list(meta.pop("image_ids"))
            labels = list(meta.pop("labels"))
            if len(orders) != len(ratios) or len(labels) != len(image_ids):
                raise ValueError("ratios/orders or image_ids/labels differ in length")
        with reading(directory / "dv.npy", "interactions result array", fix):
            if dv.ndim != 4 or dv.shape[:2] != (len(image_ids), len(ratios)):
                raise ValueError(f"shape {dv.shape} does not match meta.json "
                                 f"({len(image_ids)} images × {len(ratios)} ratios × pairs × contexts)")
        with reading(directory / "pairs.npy", "interactions pairs array", fix):
            if pairs.ndim != 3 or pairs.shape[:2] != dv.shape[:1] + dv.shape[2:3]:
                raise ValueError(f"shape {pairs.shape} does not match dv.npy {dv.shape}")
        return cls(dv=dv, pairs=pairs, ratios=ratios, orders=orders, grid=grid,
                   image_ids=image_ids, labels=labels,
                   meta={k: v for k, v in meta.items()
                         if k not in ("shape", "standard_errors", "warning", "format",
                                      "provenance")})

    # -- figures ---------------------------------------------------------------------------
    def plot(self, ax: Any = None, *, normalize: Normalize = "sampled", label: str | None = None,
             debiased: bool = False, errorbars: bool = True):
        """J against the ratio r (x axis "0.0n … 1.0n"); returns ``(fig, ax)``."""
        return plot_curves([self], [label] if label else None, ax=ax, normalize=normalize,
                           debiased=debiased, errorbars=errorbars)


@dataclass
class InteractionComparison:
    """The results of several models measured on the same images, pairs and contexts (what
    ``narrows interactions compare`` makes), by label in the order given."""

    results: dict[str, InteractionResult]

    def to_rows(self) -> list[dict[str, Any]]:
        """Each model's :meth:`InteractionResult.curve_rows`, labelled (``model``)."""
        return [{"model": label, **row} for label, result in self.results.items()
                for row in result.curve_rows()]

    def summary(self) -> str:
        """One line: each model's J (sampled) per ratio, or why it has no curve."""
        return "; ".join(f"{label} {_brief(result)}" for label, result in self.results.items())

    def headline(self) -> dict[str, float | int | None]:
        """The flat numbers of ``results.json``: each model's J (sampled) at each ratio r as
        ``"<label>.J@<r>"`` (None where J is undefined)."""
        return {f"{label}.{key}": value for label, result in self.results.items()
                for key, value in result.headline().items() if key.startswith("J@")}

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """The models' J curves overlaid (:func:`plot_curves`); returns ``(fig, ax)``."""
        return plot_curves(list(self.results.values()), list(self.results), ax=ax,
                           title="multi-order interactions")

    def save(self, directory: str | Path) -> Path:
        """Each model's result into ``directory/<label>`` (see :meth:`InteractionResult.save`)
        and ``directory/comparison.json``: the labels in order, under the narrows header."""
        directory = Path(directory)
        for label, result in self.results.items():
            result.save(directory / label)
        return self.save_index(directory)

    def save_index(self, directory: str | Path) -> Path:
        """Only ``directory/comparison.json`` (the results are saved already, each where
        :func:`~narrows.interactions.measure.compare_models` measured it)."""
        from narrows.runs.files import atomic_write_json
        from narrows.runs.results import header

        atomic_write_json(Path(directory) / COMPARISON,
                          {**header("interactions_comparison", 1), "labels": list(self.results)})
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> InteractionComparison:
        """The comparison :meth:`save` wrote into ``directory``."""
        from narrows.runs.results import read_result_json

        saved = read_result_json(directory, "interactions_comparison", 1, "interactions "
                                 "comparison", "pass the --out of 'narrows interactions compare'",
                                 file_name=COMPARISON, required_keys=("labels",))
        from narrows.runs.run import safe_name

        labels = [safe_name(str(label), "model label") for label in saved["labels"]]
        return cls({label: InteractionResult.load(Path(directory) / label) for label in labels})


def _brief(result: InteractionResult) -> str:
    """``J 0.05:1.20 0.5:0.90 …`` (sampled), or ``no curve``."""
    if result.degenerate():
        return "no curve"
    return "J " + " ".join(f"{r:g}:{v:.2f}" for r, v in zip(result.ratios, result.J(),
                                                            strict=True))


def plot_curves(results: Sequence[InteractionResult], labels: Sequence[str] | None = None, *,
                ax: Any = None, normalize: Normalize = "sampled", debiased: bool = False,
                errorbars: bool = True, title: str | None = None):
    """Overlay the J curves of several results, with a legend; returns ``(fig, ax)``.

    ``labels`` name the curves (default: each result's ``label`` metadata); ``normalize``
    (``"sampled"``: by the mean of A over the sampled ratios, ``"uniform"``: by its mean over
    the ratio interval) and ``debiased`` are as in :meth:`InteractionResult.J`; ``errorbars``
    draws the standard-error bands.

    The shaded band is ±1 jackknife standard error over images (said in the legend; none for a
    single image). The title names the model (one result) and the sample: images, pairs per
    image, contexts per pair. A result whose J is undefined (see
    :meth:`InteractionResult.degenerate`) is left out of the plot and the legend, with a note.
    """
    from matplotlib.patches import Patch

    from narrows.plotting import pyplot

    plt = pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
    else:
        fig = ax.figure
    samples = [_sample(r) for r in results]
    shared = samples[0] if samples and len(set(samples)) == 1 else None
    banded: set[int] = set()
    notes: list[str] = []
    plotted = 0
    for k, result in enumerate(results):
        name = labels[k] if labels else result.meta.get("label") or f"run {k + 1}"
        j = result.J(normalize, debiased)
        if not np.isfinite(j).all():
            reason = result.degenerate() or "J is undefined"
            notes.append(f"{name}: no curve — {reason}")
            continue
        n = int(result.dv.shape[0])
        legend = name if shared else f"{name} ({samples[k]}{'; no s.e.' if n == 1 else ''})"
        line = ax.plot(result.ratios, j, marker="o", label=legend)[0]
        plotted += 1
        se = result.stderr("J", normalize, debiased) if errorbars else None
        if se is not None and np.isfinite(se).all():
            ax.fill_between(result.ratios, j - se, j + se, alpha=0.2, color=line.get_color())
            banded.add(n)
    ax.set_xlabel("order m / n")
    ax.set_ylabel(f"interaction strength J ({normalize}{', debiased' if debiased else ''})")
    ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xticklabels([f"{t:.1f}n" for t in (0, 0.2, 0.4, 0.6, 0.8, 1.0)])
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(_title(title, results, labels, shared), fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    if banded:
        over = (f"{next(iter(banded))} images" if len(banded) == 1 else "the images of each run")
        handles.append(Patch(facecolor="grey", alpha=0.3))
        names.append(f"±1 s.e. (jackknife over {over})")
    below = 0  # points taken under the axes by a legend placed there
    if plotted and (len(handles) > 1 or labels):
        if max(len(n) for n in names) > 32:
            below = 11 * len(names) + 8  # long labels: below the axes, not over the curves
            ax.legend(handles, names, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14),
                      frameon=False)
        else:
            ax.legend(handles, names, fontsize=8)
    if not plotted:
        ax.text(0.5, 0.5, "no curve to draw (see below)", transform=ax.transAxes, ha="center",
                va="center", color="0.4")
    fig.tight_layout()
    if notes:  # under the axes, where no curve can hide it (saved with bbox_inches="tight")
        import textwrap

        text = "\n".join(textwrap.fill(n, 95, subsequent_indent="  ") for n in notes)
        ax.annotate(text, xy=(0.5, 0), xycoords="axes fraction", xytext=(0, -34 - below),
                    textcoords="offset points", ha="center", va="top", fontsize=8, color="0.25")
    return fig, ax


def plot_runs(directories: Sequence[str | Path], out: str | Path,
              labels: Sequence[str] | None = None, *, normalize: Normalize = "sampled",
              debiased: bool = False, title: str | None = None,
              say: Callable[[str], None] = print) -> Path:
    """Overlay the curves of the saved runs in ``directories`` (see :func:`plot_curves`) into
    the figure file ``out`` (``.png`` added when it has no suffix), saying which runs are left
    out and why; returns the file written."""
    from narrows.plotting import pyplot
    from narrows.runs.files import atomic_savefig

    if not directories:
        raise UserError("no run directories given", "narrows interactions plot DIR [DIR ...]")
    if labels and len(labels) != len(directories):
        raise UserError(f"{len(labels)} labels for {len(directories)} runs",
                        "give one `labels` entry per run directory")
    results = [InteractionResult.load(d) for d in directories]
    for directory, result in zip(directories, results, strict=True):
        warning = result.warning()
        if warning:
            say(f"warning: {directory} is left out of the figure — {warning}")
    fig, _ = plot_curves(results, labels, normalize=normalize, debiased=debiased, title=title)
    out = Path(out)
    if not out.suffix:  # matplotlib would write PNG bytes under a name without an extension
        out = out.with_suffix(".png")
    atomic_savefig(out, fig, dpi=150, bbox_inches="tight")
    pyplot().close(fig)
    return out


def _sample(result: InteractionResult) -> str:
    """"3 images × 20 pairs × 20 contexts" (the sizes behind each point of the curve)."""
    images, _, pairs, contexts = (int(v) for v in result.dv.shape)
    return (f"{images} image{'s' if images != 1 else ''} × {pairs} pairs × "
            f"{contexts} contexts, {result.grid}×{result.grid} patches")


def _title(title: str | None, results: Sequence[InteractionResult],
           labels: Sequence[str] | None, shared: str | None) -> str:
    head = title or "multi-order interaction strength"
    lines = [head]
    models = {str(r.meta.get("model")) for r in results if r.meta.get("model")}
    if len(results) == 1 and models:
        lines.append(next(iter(models)))
    if shared:
        single = shared.startswith("1 image ")
        lines.append(shared + (" (each run)" if len(results) > 1 else "")
                     + (": no standard error" if single else ""))
    return "\n".join(lines)


def _normalise(a: np.ndarray, ratios: Sequence[float], normalize: Normalize) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if normalize == "sampled" or (normalize == "uniform" and np.ptp(r) == 0):
        # one ratio: the mean of A over a zero-width interval is A there, as sampled gives
        denominator = a.mean(axis=-1, keepdims=True)
    elif normalize == "uniform":
        trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
        denominator = trapezoid(a, r, axis=-1)[..., None] / (r[-1] - r[0])
    else:
        raise UserError(f"unknown normaliser '{normalize}'", "use sampled or uniform")
    with np.errstate(invalid="ignore", divide="ignore"):
        return a / denominator
