"""Optimiser pieces of UDI/DINO pretraining (spec §6): parameter groups, optimisers, clipping.

Choices kept from upstream, documented (spec §10.9): gradients are clipped **per parameter
tensor** (each tensor's gradient rescaled to norm ≤ clip on its own), not by the global norm.
The head's ``last_layer`` gradients are dropped (set to None) during the first epochs, so the
optimiser skips those tensors entirely, weight decay included.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from narrows.errors import UserError

OPTIMIZERS = ("adamw", "sgd", "lars")


def is_regularised(name: str, param: Tensor) -> bool:
    """Weight decay applies to tensors that are not a ``.bias`` and have ndim > 1."""
    return not name.endswith(".bias") and param.ndim > 1


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups of the trainable parameters: regularised first, then the rest (wd 0).

    Each group carries ``regularised`` (bool) and ``names`` (the parameter names) besides
    ``params``; frozen tensors (``requires_grad=False``) are left out.
    """
    groups: list[dict[str, Any]] = [
        {"params": [], "names": [], "regularised": True},
        {"params": [], "names": [], "regularised": False, "weight_decay": 0.0},
    ]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = groups[0] if is_regularised(name, param) else groups[1]
        group["params"].append(param)
        group["names"].append(name)
    return groups


class LARS(torch.optim.Optimizer):
    """LARS in the style of DINO's: SGD with momentum whose step is scaled per tensor.

    For a tensor with ndim > 1: g ← g + wd·p, then g ← g·(eta·‖p‖/‖g‖) when both norms are
    positive. Tensors with ndim ≤ 1 (biases, norms) get neither weight decay nor the
    adaptation. Then μ ← momentum·μ + g and p ← p − lr·μ.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, eta: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay,
                                  "momentum": momentum, "eta": eta})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = group["eta"] * p_norm / u_norm.clamp_min(torch.finfo(u_norm.dtype).tiny)
                    scale = torch.where((p_norm > 0) & (u_norm > 0), ratio,
                                        torch.ones_like(p_norm))
                    update = update * scale
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """``adamw`` (torch's), ``sgd`` (momentum 0.9) or ``lars`` (:class:`LARS`) over ``groups``.

    The weight decay of the regularised group is set each step by :func:`set_schedules`.
    """
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "lars":
        return LARS(groups, lr=lr)
    raise UserError(f"unknown optimizer {name!r}", f"use one of {', '.join(OPTIMIZERS)}")


def clip_per_tensor(model: nn.Module, clip: float) -> torch.Tensor:
    """Rescale each parameter's gradient to 2-norm ≤ ``clip`` on its own (0 = measure only).

    Returns the gradient norms before clipping (a float32 tensor, one per parameter that has a
    gradient). All tensors are handled by a few fused ``torch._foreach`` calls, with no
    host-device synchronisation.
    """
    grads = [param.grad.detach() for param in model.parameters() if param.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([norm.float() for norm in torch._foreach_norm(grads)])
    if clip > 0:
        coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coefs.unbind(), grads,
                                                                     strict=True)])
    return norms


def cancel_last_layer(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """During epochs < ``freeze_epochs`` drop the gradients of every ``last_layer`` parameter."""
    if epoch >= freeze_epochs:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Give ``lr`` to every group and ``wd`` to the regularised group (the first one if unmarked)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if group.get("regularised", i == 0):
            group["weight_decay"] = wd
