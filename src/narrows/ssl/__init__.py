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
    "knn_top1": "knn", "knn_predict": "knn",
}

__all__ = lazy_package(__name__, _WHERE)
