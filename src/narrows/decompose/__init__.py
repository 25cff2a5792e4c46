"""Class-specific filters and the decomposed final layer ("Decomposing the Deep").

* :class:`ClassIndices`: each class's influential channel ids; the upstream JSON file and ours;
  ``random`` and ``top_weights`` baselines.
* :func:`split_head`: any model whose classifier is its last ``nn.Linear`` as the features that
  layer reads ``(N, D)`` plus the layer (from the core, :mod:`narrows.models.heads`).
* :func:`extract` (and :func:`extract_fractional`, variant A): the streamed per-class
  frequency histograms of each image's top-k channels, as an :class:`Extraction` (indices,
  top-k mass and selectivity Ψ diagnostics, heat map, save/load).
* :class:`DecomposedLinear` (from the core, :mod:`narrows.models.decomposed`, so that every tool
  loads a decomposed checkpoint), :func:`decompose`, :func:`load_decomposed`: the decomposed head.
* :func:`validate`, :func:`accuracy_curve` (:class:`Curve`): decomposed accuracy, at given
  indices or as a function of k.
* :func:`finetune`, :func:`finetune_settings`: fine-tuning on the core training loop.
* Index-set rules (:mod:`~narrows.decompose.rules`): :func:`default_k`, :func:`nearest_k`,
  :func:`within_width`, :func:`load_indices` (checked against a model), :func:`truncate`.
* Whole runs on a loaded subject (:mod:`~narrows.decompose.pipeline`): :func:`extract_subject`
  (an :class:`Extraction`, saved into a run) and :func:`validation_report`
  (:class:`ValidationReport`).
* Comparisons (:mod:`~narrows.decompose.compare`, :mod:`~narrows.decompose.mi_compare`):
  :func:`essential_sets` + :func:`essential_comparison` (:class:`EssentialComparison`),
  :func:`mutual_info_comparison` (:class:`MIComparison`, with MIS), CSG gates via
  :func:`load_csg_subject` and :func:`csg_orders`; :func:`plot_gate` draws a CSG gate;
  :func:`train_csg` (:class:`CSGOptions`) trains one.
* The commands' options (:mod:`~narrows.decompose.options`): :class:`ExtractOptions`,
  :class:`ValidateOptions`, :class:`FinetuneOptions`, :class:`EssentialOptions`,
  :class:`MutualInfoOptions` (both with :class:`CSGCompareOptions`), :class:`CSGTrainOptions`
  (:func:`csg_options`); the functions above take them and default to them.

Names are imported on first use, so :mod:`~narrows.decompose.options` (the commands'
options) loads without torch. The command line is ``narrows decompose extract | validate |
finetune | ...``.
"""

from __future__ import annotations

from narrows.lazy import lazy_package

_WHERE = {
    "EssentialComparison": "compare", "Tested": "compare", "essential_comparison": "compare",
    "essential_sets": "compare",
    "csg_orders": "csg", "load_csg_subject": "csg", "plot_gate": "csg",
    "CSGOptions": "csg_train", "train_csg": "csg_train",
    "Curve": "curve", "accuracy_curve": "curve", "validate": "curve",
    "DEFAULT_THRESHOLDS": "extract", "curve_ks": "extract", "extract": "extract",
    "extract_fractional": "extract", "features_at": "extract",
    "Extraction": "extraction",
    "finetune": "finetune", "finetune_settings": "finetune",
    "DecomposedLinear": "head", "LoadedDecomposed": "head", "decompose": "head",
    "decomposed_parts": "head", "find_decomposed": "head", "head_indices": "head",
    "load_decomposed": "head",
    "TopKHistogram": "histogram",
    "ClassIndices": "indices",
    "MIComparison": "mi_compare", "mis_scores": "mi_compare",
    "mutual_info_comparison": "mi_compare",
    "check_split": "parts", "classifier_name": "parts", "replace_classifier": "parts",
    "split_head": "parts",
    "ValidationReport": "pipeline", "extract_subject": "pipeline",
    "save_extraction": "pipeline", "validation_report": "pipeline",
    "default_k": "rules", "head_shape": "rules", "load_indices": "rules", "nearest_k": "rules",
    "truncate": "rules", "within_width": "rules",
    "ExtractOptions": "options", "ValidateOptions": "options", "FinetuneOptions": "options",
    "CSGCompareOptions": "options", "EssentialOptions": "options",
    "MutualInfoOptions": "options", "CSGTrainOptions": "options", "csg_options": "csg_train",
}

__all__ = lazy_package(__name__, _WHERE, shadowed=("extract", "finetune"))
