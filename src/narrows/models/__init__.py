"""Models: narrows' CIFAR architectures (registered with timm), cards and checkpoints.

Importing this package registers ``resnet{20,32,44,56,110}_cifar`` and ``alexnet_cifar`` with
timm, so ``timm.create_model("resnet20_cifar")`` works afterwards.

* :func:`create` builds any timm model by name (or the user's own ``file.py:Class`` /
  ``module:Class``), optionally with strictly loaded weights; :func:`create_for_input` builds
  one for a data size (``img_size`` for fixed-size models) and checks that it runs on it.
* :func:`load_model` rebuilds a model from a checkpoint (from its :class:`ModelCard` when it has one).
* :func:`save_model` writes weights and card (``.pt`` or ``.safetensors``), atomically.
* :func:`read_checkpoint` and :func:`load_state_dict_strict` are the lower-level pieces.
* :func:`list_models` lists model names, narrows' own first.
* :func:`load_subject` is where an analysis starts: a checkpoint (or a name) with its data set,
  served at the card's size and normalisation (:class:`Subject`).
* :func:`pooled_features` gives ``x -> (N, D)``, the pooled features a classifier reads (its
  input); :func:`split_head` the same with the final linear layer.
* :func:`get_layer`, :func:`run_to_layer`, :func:`capture` and :func:`hooked` address a layer by
  its dotted name: find it, run the model up to it, catch its output in a ``with`` block.
"""

from narrows.models.card import ModelCard
from narrows.models.checkpoints import Checkpoint, model_fingerprint, read_checkpoint, save_model
from narrows.models.cifar_alexnet import CifarAlexNet
from narrows.models.cifar_resnet import CifarResNet
from narrows.models.factory import (
    LoadedModel,
    create,
    create_for_input,
    infer_sizes,
    load_model,
)
from narrows.models.heads import pooled_features, split_head
from narrows.models.layers import capture, get_layer, hooked, run_to_layer
from narrows.models.registry import (
    NARROWS_MODELS,
    canonical_name,
    check_name,
    display_name,
    is_custom,
    list_models,
)
from narrows.models.strict import load_state_dict_strict
from narrows.models.subject import Subject, load_subject

__all__ = [
    "NARROWS_MODELS",
    "Checkpoint",
    "CifarAlexNet",
    "CifarResNet",
    "LoadedModel",
    "ModelCard",
    "Subject",
    "canonical_name",
    "capture",
    "check_name",
    "create",
    "create_for_input",
    "display_name",
    "get_layer",
    "hooked",
    "infer_sizes",
    "is_custom",
    "list_models",
    "load_model",
    "load_state_dict_strict",
    "load_subject",
    "model_fingerprint",
    "pooled_features",
    "read_checkpoint",
    "run_to_layer",
    "save_model",
    "split_head",
]
