"""Evaluation metrics for attribution heatmaps: degradation, bounding-box ratio, sensitivity-n,
and the cascading model-parameter randomisation check.

The metrics that run the model take ``N×C×H×W`` images in [0, 1] with ``normalizer=`` (a
:class:`~narrows.training.Normalizer`, callable or ``Subject``; the one input convention), or
model inputs (normalised) without it; ``N×H×W`` heatmaps; batched forwards. They are
model-agnostic (any ``nn.Module`` returning ``N×classes`` logits). :func:`bbox_ratio` reads only
the heatmaps.
"""

from narrows.attribution.metrics.bbox import BBoxResult, bbox_ratio, boxes_to_mask
from narrows.attribution.metrics.degradation import (
    DegradationResult,
    degradation,
    removal_steps,
    tile_grid,
)
from narrows.attribution.metrics.randomisation import (
    RandomisationResult,
    cascade_layers,
    cascading_randomisation,
    minmax_normalise,
    spearman,
    ssim,
)
from narrows.attribution.metrics.sensitivity import (
    SensitivityNResult,
    default_ns,
    pearson,
    sensitivity_n,
)

__all__ = [
    "BBoxResult",
    "DegradationResult",
    "RandomisationResult",
    "SensitivityNResult",
    "bbox_ratio",
    "boxes_to_mask",
    "cascade_layers",
    "cascading_randomisation",
    "default_ns",
    "degradation",
    "minmax_normalise",
    "pearson",
    "removal_steps",
    "sensitivity_n",
    "spearman",
    "ssim",
    "tile_grid",
]
