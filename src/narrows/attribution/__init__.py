"""Attribution: Information Bottleneck Attribution (IBA), baselines and their evaluation.

* IBA (Schulz et al., ICLR 2020): :class:`FeatureStatistics` / :func:`estimate_statistics`,
  :class:`Bottleneck`, :class:`IBA` (per-sample), :class:`AttributionResult` (heatmaps in bits);
  the readout bottleneck: :class:`ReadoutBottleneck`, :func:`train_readout`, :class:`ReadoutIBA`.
* Baselines through Captum (optional extra ``narrows[baselines]``): :func:`make_method`,
  :func:`available_methods`; captum is imported only when a method is built.
* One interface for every explainer: ``get_method(name)(model, layer=None,
  **options).attribute(inputs, target)`` returns an :class:`AttributionResult`
  (:data:`METHODS`, :func:`method_names`, :class:`MethodSettings` for all options at once).
* Evaluation: :func:`degradation`, :func:`bbox_ratio`, :func:`sensitivity_n`; the sanity check
  :func:`cascading_randomisation`. The commands as functions: :func:`explain_images`,
  :func:`evaluate_methods`, :func:`sanity_check`, :func:`statistics_for` (load or estimate IBA's
  statistics), :func:`pick_indices` (which test images).

Importing this package does not import captum.
"""

from narrows.attribution.baselines import BASELINES, available_methods, make_method
from narrows.attribution.bottleneck import Bottleneck, capacity, gaussian_kernel
from narrows.attribution.evaluation import EvaluationResult, evaluate_methods
from narrows.attribution.explain import explain_images
from narrows.attribution.heatmap import AttributionResult, bits_per_cell, heatmap_from_capacity
from narrows.attribution.images import describe_images, pick_indices
from narrows.attribution.layers import default_layer, get_layer, run_to_layer
from narrows.attribution.methods import (
    METHODS,
    Method,
    MethodSettings,
    check_methods,
    get_method,
    method_names,
)
from narrows.attribution.metrics import (
    bbox_ratio,
    cascading_randomisation,
    degradation,
    sensitivity_n,
)
from narrows.attribution.per_sample import IBA
from narrows.attribution.readout import (
    ReadoutBottleneck,
    ReadoutIBA,
    default_readout_layers,
    estimate_readout_statistics,
    train_readout,
)
from narrows.attribution.sanity import SanityResult, sanity_check
from narrows.attribution.statistics import FeatureStatistics, estimate_statistics, statistics_for

__all__ = [
    "BASELINES",
    "METHODS",
    "AttributionResult",
    "Bottleneck",
    "EvaluationResult",
    "FeatureStatistics",
    "IBA",
    "Method",
    "MethodSettings",
    "SanityResult",
    "ReadoutBottleneck",
    "ReadoutIBA",
    "available_methods",
    "bbox_ratio",
    "bits_per_cell",
    "capacity",
    "cascading_randomisation",
    "check_methods",
    "default_layer",
    "default_readout_layers",
    "degradation",
    "describe_images",
    "evaluate_methods",
    "explain_images",
    "estimate_readout_statistics",
    "estimate_statistics",
    "gaussian_kernel",
    "get_layer",
    "get_method",
    "heatmap_from_capacity",
    "make_method",
    "method_names",
    "pick_indices",
    "run_to_layer",
    "sanity_check",
    "sensitivity_n",
    "statistics_for",
    "train_readout",
]
