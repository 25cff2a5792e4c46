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
  statistics), :func:`pick_indices` (which test images). Their options, with the commands'
  defaults: :mod:`narrows.attribution.options` (:class:`IBAOptions`, :class:`EvaluateOptions`,
  ...; torch-free, as is importing this package).

Inputs follow the one convention of narrows: images in [0, 1] as the data set serves them, and
``normalizer=`` (a :class:`~narrows.training.Normalizer`, any function of images or a
``Subject``; the explainers also take ``mean=``/``std=``) given to the explainer, to
:func:`estimate_statistics` (which also takes a data set or loader) and to the metrics, which
normalise first (:mod:`narrows.attribution.inputs`). Left out, inputs are model inputs.

Importing this package does not import captum.
"""

from narrows.lazy import lazy_package

_WHERE = {
    "BASELINES": "narrows.attribution.baselines",
    "available_methods": "narrows.attribution.baselines",
    "make_method": "narrows.attribution.baselines",
    "Bottleneck": "narrows.attribution.bottleneck",
    "capacity": "narrows.attribution.bottleneck",
    "gaussian_kernel": "narrows.attribution.bottleneck",
    "EvaluationResult": "narrows.attribution.evaluation",
    "evaluate_methods": "narrows.attribution.evaluation",
    "explain_images": "narrows.attribution.explain",
    "AttributionResult": "narrows.attribution.heatmap",
    "bits_per_cell": "narrows.attribution.heatmap",
    "heatmap_from_capacity": "narrows.attribution.heatmap",
    "describe_images": "narrows.attribution.images",
    "pick_indices": "narrows.attribution.images",
    "default_layer": "narrows.attribution.layers",
    "get_layer": "narrows.attribution.layers",
    "run_to_layer": "narrows.attribution.layers",
    "METHODS": "narrows.attribution.methods",
    "Method": "narrows.attribution.methods",
    "MethodSettings": "narrows.attribution.methods",
    "check_methods": "narrows.attribution.methods",
    "get_method": "narrows.attribution.methods",
    "method_names": "narrows.attribution.methods",
    "bbox_ratio": "narrows.attribution.metrics",
    "cascading_randomisation": "narrows.attribution.metrics",
    "degradation": "narrows.attribution.metrics",
    "sensitivity_n": "narrows.attribution.metrics",
    "IBA": "narrows.attribution.per_sample",
    "ReadoutBottleneck": "narrows.attribution.readout",
    "ReadoutIBA": "narrows.attribution.readout",
    "default_readout_layers": "narrows.attribution.readout",
    "estimate_readout_statistics": "narrows.attribution.readout",
    "train_readout": "narrows.attribution.readout",
    "SanityResult": "narrows.attribution.sanity",
    "sanity_check": "narrows.attribution.sanity",
    "FeatureStatistics": "narrows.attribution.statistics",
    "estimate_statistics": "narrows.attribution.statistics",
    "statistics_for": "narrows.attribution.statistics",
    "EvaluateOptions": "narrows.attribution.options",
    "ExplainOptions": "narrows.attribution.options",
    "IBAOptions": "narrows.attribution.options",
    "ImageChoice": "narrows.attribution.options",
    "LayerOption": "narrows.attribution.options",
    "ReadoutTrainOptions": "narrows.attribution.options",
    "SanityOptions": "narrows.attribution.options",
    "StatisticsOptions": "narrows.attribution.options",
    "StatsOptions": "narrows.attribution.options",
}


__all__ = lazy_package(__name__, _WHERE)
