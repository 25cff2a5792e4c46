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

The command line is ``narrows decompose extract | validate | finetune | ...``.
"""

from narrows.decompose.compare import (
    EssentialComparison,
    Tested,
    essential_comparison,
    essential_sets,
)
from narrows.decompose.csg import csg_orders, load_csg_subject, plot_gate
from narrows.decompose.csg_train import CSGOptions, train_csg
from narrows.decompose.curve import Curve, accuracy_curve, validate
from narrows.decompose.extract import (
    DEFAULT_THRESHOLDS,
    curve_ks,
    extract,
    extract_fractional,
    features_at,
)
from narrows.decompose.extraction import Extraction
from narrows.decompose.finetune import finetune, finetune_settings
from narrows.decompose.head import (
    DecomposedLinear,
    LoadedDecomposed,
    decompose,
    decomposed_parts,
    find_decomposed,
    head_indices,
    load_decomposed,
)
from narrows.decompose.histogram import TopKHistogram
from narrows.decompose.indices import ClassIndices
from narrows.decompose.mi_compare import MIComparison, mis_scores, mutual_info_comparison
from narrows.decompose.parts import check_split, classifier_name, replace_classifier, split_head
from narrows.decompose.pipeline import (
    ValidationReport,
    extract_subject,
    save_extraction,
    validation_report,
)
from narrows.decompose.rules import (
    default_k,
    head_shape,
    load_indices,
    nearest_k,
    truncate,
    within_width,
)

__all__ = [
    "CSGOptions",
    "ClassIndices",
    "Curve",
    "DEFAULT_THRESHOLDS",
    "DecomposedLinear",
    "EssentialComparison",
    "Extraction",
    "LoadedDecomposed",
    "MIComparison",
    "Tested",
    "TopKHistogram",
    "ValidationReport",
    "accuracy_curve",
    "check_split",
    "classifier_name",
    "csg_orders",
    "curve_ks",
    "decompose",
    "decomposed_parts",
    "default_k",
    "essential_comparison",
    "essential_sets",
    "extract",
    "extract_fractional",
    "extract_subject",
    "features_at",
    "find_decomposed",
    "finetune",
    "finetune_settings",
    "head_indices",
    "head_shape",
    "load_csg_subject",
    "load_decomposed",
    "load_indices",
    "mis_scores",
    "mutual_info_comparison",
    "nearest_k",
    "plot_gate",
    "replace_classifier",
    "save_extraction",
    "split_head",
    "truncate",
    "validate",
    "validation_report",
    "within_width",
    "train_csg",
]
