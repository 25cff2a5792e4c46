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

The command line is ``narrows decompose extract | validate | finetune | ...``.
"""

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
from narrows.decompose.parts import check_split, classifier_name, replace_classifier, split_head

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ClassIndices",
    "Curve",
    "DecomposedLinear",
    "Extraction",
    "LoadedDecomposed",
    "TopKHistogram",
    "accuracy_curve",
    "check_split",
    "classifier_name",
    "curve_ks",
    "decompose",
    "decomposed_parts",
    "extract",
    "extract_fractional",
    "features_at",
    "find_decomposed",
    "head_indices",
    "finetune",
    "finetune_settings",
    "load_decomposed",
    "replace_classifier",
    "split_head",
    "validate",
]
