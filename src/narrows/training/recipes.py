"""Fine-tuning recipes on top of the plain loop (BEiT/DeiT): layer-wise learning-rate decay,
mixup/cutmix with soft targets, RandAugment and random erasing.

Each piece is off at :class:`~narrows.training.TrainOptions`' defaults, and ``fit`` only
imports this module when one is on, so plain ``narrows train`` runs are unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from narrows.errors import UserError

#: parameter names (prefixes) of a ViT's embedding stage: layer id 0 of the layer decay
EMBEDDING_NAMES = ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed", "norm_pre")


def is_block_vit(model: nn.Module) -> bool:
    """A ViT-like model: a ``patch_embed`` followed by a sequence of ``blocks``."""
    return hasattr(model, "patch_embed") and isinstance(getattr(model, "blocks", None),
                                                        (nn.Sequential, nn.ModuleList))


def vit_layer_id(name: str, depth: int) -> int:
    """BEiT's layer id of parameter ``name`` in a ViT of ``depth`` blocks: 0 for the embeddings
    (patch embedding, class/register tokens, position embedding), ``i + 1`` for block ``i``,
    ``depth + 1`` for everything after the blocks (final norm, head)."""
    if name.startswith(EMBEDDING_NAMES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatch(name, p) for p in patterns)


def layer_decay_groups(model: nn.Module, *, weight_decay: float, layer_decay: float
                       ) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise lr decay: each group has ``lr_scale``
    (``layer_decay ** (depth + 1 - id)``, see :func:`vit_layer_id`) and its ``weight_decay``
    (``weight_decay``, or 0 for 1-d parameters and the model's ``no_weight_decay()`` names:
    position embedding, class and register tokens).

    For ViTs the ids are BEiT's (the final norm learns at the head's rate; timm 1.0's own
    grouping puts it with the last block). Other models fall back to timm's
    ``param_groups_layer_decay`` (its ``group_matcher`` or automatic grouping).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if not is_block_vit(model):
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(model, weight_decay=weight_decay,
                                        no_weight_decay_list=sorted(skip),
                                        layer_decay=layer_decay)
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = vit_layer_id(name, depth)
        decays = not (param.ndim <= 1 or _matches(name, skip))
        key = (layer, decays)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0,
                           "lr_scale": layer_decay ** (depth + 1 - layer)}
        groups[key]["params"].append(param)
    return list(groups.values())


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mixup_loss(settings: Any, num_classes: int) -> LossFn:
    """A ``loss_fn(model, inputs, labels) -> (loss, logits)`` for ``fit`` that mixes each batch
    with timm's ``Mixup`` (``settings``: mixup/cutmix alphas, mixup_prob, mixup_switch_prob,
    label_smoothing) into soft targets over ``num_classes`` and scores them with a soft-target
    cross-entropy. Mixup pairs image i with image B−1−i, so a batch of odd size (a last
    batch) is not mixed; its targets are still smoothed.

    The mixing draws come from numpy's global generator (timm's choice): ``fit`` seeds it at
    every epoch, so a resumed run mixes exactly as an uninterrupted one.
    """
    from timm.data import Mixup
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    mixer = Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix,
                  prob=settings.mixup_prob, switch_prob=settings.mixup_switch_prob, mode="batch",
                  label_smoothing=settings.label_smoothing, num_classes=num_classes)
    criterion = SoftTargetCrossEntropy()

    def loss_fn(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
        if inputs.shape[0] % 2 == 0:
            inputs, targets = mixer(inputs.clone(), labels)
        else:
            targets = mixup_target(labels, num_classes, smoothing=settings.label_smoothing)
        logits = model(inputs)
        return criterion(logits, targets), logits

    return loss_fn


def randaugment_on(settings: Any) -> bool:
    """Whether ``settings`` ask for RandAugment."""
    spec = getattr(settings, "randaugment", None)
    return bool(spec) and str(spec).lower() != "none"


def train_transform(settings: Any, mean: Iterable[float], std: Iterable[float]
                    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The extra per-image training transform of ``settings`` (RandAugment, then random
    erasing), on float images ``[C, H, W]`` in [0, 1] as the data sets serve them; ``None`` when
    both are off.

    RandAugment is timm's ``rand_augment_transform`` on the image as PIL (bicubic, filled
    with the data's ``mean`` colour); random erasing is timm's ``RandomErasing`` in pixel
    mode, applied in the normalised space (``mean``, ``std``) where its noise is meant to
    live, and mapped back to [0, 1] scale.
    """
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    if randaugment_on(settings):
        steps.append(_randaugment(str(settings.randaugment), tuple(mean_t.flatten().tolist())))
    if settings.random_erasing > 0:
        from timm.data.random_erasing import RandomErasing

        eraser = RandomErasing(probability=settings.random_erasing, mode="pixel", device="cpu")

        def erase(image: torch.Tensor) -> torch.Tensor:
            normed = (image - mean_t) / std_t
            return eraser(normed) * std_t + mean_t

        steps.append(erase)
    if not steps:
        return None

    def transform(image: torch.Tensor) -> torch.Tensor:
        for step in steps:
            image = step(image)
        return image

    return transform


def _randaugment(spec: str, mean: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    fill = tuple(round(255 * m) for m in mean)
    try:
        augment = rand_augment_transform(spec, {
            "img_mean": fill if len(fill) > 1 else fill[0],
            "interpolation": Image.BICUBIC})
    except (AssertionError, ValueError, KeyError) as exc:
        raise UserError(f"--randaugment {spec} is not a RandAugment timm understands ({exc})",
                        "give e.g. rand-m9-mstd0.5-inc1") from None
    for op in getattr(augment, "ops", []):
        if op.aug_fn.__name__ == "posterize":
            op.aug_fn = _posterize_at_least_one_bit(op.aug_fn)

    def apply(image: torch.Tensor) -> torch.Tensor:
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8)
        out = augment(to_pil_image(pixels))
        return pil_to_tensor(out).to(image.dtype) / 255

    return apply


def _posterize_at_least_one_bit(posterize: Callable[..., Any]) -> Callable[..., Any]:
    """timm's posterize keeping at least 1 bit: at magnitude 10 (reached with ``mstd`` noise)
    "PosterizeIncreasing" asks for 0 bits, which Pillow ≥ 11 refuses (older Pillow returned a
    black image)."""

    def posterize_kept(image: Any, bits: int, **kwargs: Any) -> Any:
        return posterize(image, max(1, int(bits)), **kwargs)

    return posterize_kept


class Augmented(Dataset):
    """``dataset`` (items ``(image, label)``) with ``transform`` applied to each image after the
    data set's own augmentation."""

    def __init__(self, dataset: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.dataset[index]
        return self.transform(image), label
