"""The terminal reports of ``narrows decompose extract`` and ``validate``, as text."""

from __future__ import annotations

from typing import Any

from narrows.decompose.extraction import Extraction, class_labels

SHOWN_CLASSES = 10


def class_title(c: int, name: str) -> str:
    """``class 3 (cat)``, or ``class 3`` where the name is only the id."""
    return f"class {c}" if name == str(c) else f"class {c} ({name})"


def extraction_report(result: Extraction) -> str:
    """Several lines: the chosen k, the union of the classes' channels, the top-k mass, the
    selectivity Ψ and the indices of the first classes."""
    summary = result.diagnostics()
    chosen = result.chosen()
    lines = [f"k = {chosen.k or 'per class ' + str([len(r) for r in chosen.indices])} "
             f"(per image: {result.k_img}); union of the classes' channels: "
             f"{summary['union_size']} of {result.num_channels}; mean top-{result.k_mass} mass "
             f"{summary['mean_mass_overall']:.3f}"]
    for t, psi in summary.get("psi", {}).items():
        lines.append(f"selectivity Ψ({t}) = {psi['overall_median']:.3f} (median-based), "
                     f"{psi['overall_mean']:.3f} (mean-based)")
    names = class_labels(result.meta.get("class_names"), len(chosen.indices))
    for c, row in enumerate(chosen.indices[:SHOWN_CLASSES]):
        lines.append(f"  {class_title(c, names[c])}: {row}")
    if len(chosen.indices) > SHOWN_CLASSES:
        lines.append(f"  ... {len(chosen.indices) - SHOWN_CLASSES} more classes")
    return "\n".join(lines)


def validation_lines(results: dict[str, Any]) -> list[str]:
    """The accuracies of a validation's ``results`` (full, decomposed) and its curve table."""
    lines = []
    if "full" in results:
        lines.append(f"full model: top-1 {100 * results['full']['top1']:.2f}% on "
                     f"{results['n']} images")
    if "decomposed" in results:
        dec = results["decomposed"]
        lines.append(f"decomposed ({dec.get('indices')}, k = {dec.get('k')}): top-1 "
                     f"{100 * dec['top1']:.2f}%")
    if "curve_table" in results:
        lines.append(results["curve_table"])
    return lines
