"""Attribution: Information Bottleneck Attribution (IBA), baselines and their evaluation.

* IBA (Schulz et al., ICLR 2020): :class:`FeatureStatistics` / :func:`estimate_statistics`,
  :class:`Bottleneck`, :class:`IBA` (per-sample), :class:`AttributionResult` (heatmaps in bits);
  the readout bottleneck: :class:`ReadoutBottleneck`, :func:`train_readout`, :class:`ReadoutIBA`.
* Baselines through Captum (optional extra ``narrows[baselines]``): :func:`make_method`,
  :func:`available_methods`; captum is imported only when a method is built.
* Evaluation: :func:`degradation`, :func:`bbox_ratio`, :func:`sensitivity_n`; the sanity check
  :func:`cascading_randomisation`.

Importing this package does not import captum.
"""

from narrows.attribution.baselines import BASELINES, available_methods, make_method
from narrows.attribution.bottleneck import Bottleneck, capacity, gaussian_kernel
from narrows.attribution.heatmap import AttributionResult, bits_per_cell, heatmap_from_capacity
from narrows.attribution.layers import default_layer, get_layer, run_to_layer
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
from narrows.attribution.statistics import FeatureStatistics, estimate_statistics

__all__ = [
    "BASELINES",
    "AttributionResult",
    "Bottleneck",
    "FeatureStatistics",
    "IBA",
    "ReadoutBottleneck",
    "ReadoutIBA",
    "available_methods",
    "bbox_ratio",
    "bits_per_cell",
    "capacity",
    "cascading_randomisation",
    "default_layer",
    "default_readout_layers",
    "degradation",
    "estimate_readout_statistics",
    "estimate_statistics",
    "gaussian_kernel",
    "get_layer",
    "heatmap_from_capacity",
    "make_method",
    "run_to_layer",
    "sensitivity_n",
    "train_readout",
]
