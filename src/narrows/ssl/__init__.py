"""UDI (and DINO) self-supervised pretraining of vision transformers.

* :func:`pretrain` (``narrows ssl train``): a student ViT distilled into an EMA teacher with
  UDI's three losses, or DINO's (:class:`SSLOptions`, presets in :data:`PRESETS`); returns a
  :class:`PretrainResult`.
* :class:`UDIModel`, :func:`build_pair`: backbone + LN_1 + :class:`SRSAttention` + one
  :class:`DINOHead`; :class:`UDILoss`: the three levels and their centres.
* :class:`MultiCropViews`, :class:`ViewDataset`, :func:`collate_views`, :func:`photometric`:
  the views, their sampling maps and the colour operations.
* :func:`export_checkpoint` (``narrows ssl export``), :func:`read_upstream`,
  :func:`load_upstream`: checkpoints in and out; :func:`knn_top1`: DINO's weighted kNN.
* Evaluation: :func:`load_eval_backbone` reads any checkpoint layout (:func:`detect_layout`)
  into an :class:`EvalBackbone`; :func:`backbone_features` gives its (cached) features as
  :class:`FeatureTable` s; :func:`evaluate_knn` (:class:`KNNResult`),
  :func:`attention_maps`, :func:`threshold_masks`, :func:`visualise_attention`
  (:class:`AttentionResult`), the probes :func:`linear_probe` / :func:`train_heads`
  (:class:`LinearResult`), :func:`patch_probe` (:class:`PatchProbeResult`),
  :func:`multilabel_probe` (:class:`MultiLabelResult`); :func:`finetune`; their options
  (:class:`EvalSubject`, :class:`KNNOptions`, :class:`LinearOptions`,
  :class:`FinetuneOptions`, :class:`AttentionOptions`, :class:`PatchProbeOptions`,
  :class:`MultiLabelOptions`).

Names are imported on first use, so ``narrows.ssl.options`` loads without torch.
"""

from __future__ import annotations

from narrows.lazy import lazy_package

_WHERE = {
    "SSLOptions": "options", "PRESETS": "options", "ExportOptions": "options",
    "pretrain": "trainer", "build_pretraining": "trainer", "PretrainResult": "result",
    "UDIModel": "model", "SRSAttention": "model", "DINOHead": "model", "build_pair": "model",
    "pair_for": "model",
    "UDILoss": "loss", "StudentOutput": "loss", "TeacherOutput": "loss",
    "MultiCropViews": "views", "ViewOptions": "views", "ViewDataset": "views",
    "collate_views": "views", "photometric": "views",
    "export_checkpoint": "export", "load_pretrained": "export",
    "read_upstream": "checkpoints", "load_upstream": "checkpoints",
    "export_backbone": "checkpoints",
    "knn_top1": "knn", "knn_predict": "knn", "knn_scores": "knn", "knn_evaluate": "knn",
    "detect_layout": "checkpoints", "load_backbone_only": "checkpoints",
    "EvalBackbone": "backbones", "load_eval_backbone": "backbones",
    "backbone_features": "backbones", "FeatureTable": "backbones",
    "EvalSubject": "eval_options", "KNNOptions": "eval_options", "LinearOptions": "eval_options",
    "FinetuneOptions": "eval_options", "AttentionOptions": "eval_options",
    "PatchProbeOptions": "eval_options", "MultiLabelOptions": "eval_options",
    "evaluate_knn": "knn_eval", "KNNResult": "knn_eval",
    "attention_maps": "attention", "threshold_masks": "attention",
    "visualise_attention": "attention", "AttentionResult": "attention",
    "linear_probe": "linear", "train_heads": "linear", "LinearResult": "linear",
    "patch_probe": "dense", "multilabel_probe": "dense", "MultiHeadLinear": "linear",
    "patch_targets": "dense", "confusion_miou": "dense", "open_subject": "backbones",
    "ComparisonResult": "compare",
    "PatchProbeResult": "dense", "MultiLabelResult": "dense",
    "finetune": "finetune",
}

__all__ = lazy_package(__name__, _WHERE)
