"""``narrows interactions train``: training with a loss that encourages or penalises orders."""

from __future__ import annotations

from narrows.cli.app import command
from narrows.cli.common import flag_errors
from narrows.cli.train import TrainConfig, run_training
from narrows.config import compose
from narrows.interactions.options import OrderLossOptions
from narrows.interactions.recipes import recipe_name as run_name
from narrows.interactions.recipes import resolve_recipe

OrderTrainConfig = compose("OrderTrainConfig", OrderLossOptions, TrainConfig)


def build_loss(cfg: OrderTrainConfig, recipe: tuple[str, float, float]):
    """The :class:`OrderLoss` for ``cfg``; checks the grid against the data set's image size."""
    from narrows.interactions.order_loss import OrderLoss
    from narrows.interactions.players import PlayerGrid

    info = cfg.training_data().info
    PlayerGrid(cfg.grid, info.image_size, info.image_size)  # fail before training starts
    kind, r1, r2 = recipe
    return OrderLoss.from_options(cfg, kind, r1, r2, mean=tuple(info.mean), std=tuple(info.std),
                                  label_smoothing=cfg.label_smoothing)


def execute(cfg: OrderTrainConfig) -> int:
    with flag_errors():
        recipe = resolve_recipe(cfg)
    loss_fn = build_loss(cfg, recipe) if recipe is not None else None
    return run_training(cfg, "interactions train", loss_fn=loss_fn,
                        default_name=run_name(cfg, recipe))


command(
    "interactions train", OrderTrainConfig, execute,
    summary="train with a loss that encourages or penalises interactions of some orders",
    description="Train as 'narrows train' does, adding the order loss of Deng et al. (ICLR "
    "2022): for each image two nested random sets of grid patches S1 ⊂ S2 keep r1·n and r2·n "
    "of the n = grid² patches (the rest set to the baseline), and Δu = u(S2) − (r2/r1)·u(S1) "
    "(u = logits; coefficient 1 when r1 = 0). 'encourage' adds the cross-entropy of softmax(Δu), "
    "'penalize' its negative entropy. metrics.jsonl gains order_loss, cls_loss and "
    "delta_u_top1 (accuracy of argmax Δu) per epoch. By default the masked passes do not "
    "update BatchNorm running statistics, so that masked images do not distort evaluation "
    "(--bn-mode train = upstream).",
    epilog="examples:\n"
    "  narrows interactions train --data digits --recipe high --epochs 15\n"
    "  narrows interactions train -d digits --loss encourage --r1 0.3 --r2 0.7 --grid 8\n"
    "  # upstream CIFAR-10 mid-order model:\n"
    "  narrows interactions train --model alexnet_cifar --data cifar10:data --recipe mid "
    "--grid 16 --epochs 200 --lr 0.01 --schedule log --batch-size 128 --bn-mode train")
