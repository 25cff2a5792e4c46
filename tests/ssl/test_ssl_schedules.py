"""Schedules and optimiser pieces (spec §6, §10.9, §10.14) against closed forms and torch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from narrows.errors import UserError
from narrows.ssl.optim import (
    LARS,
    cancel_last_layer,
    clip_per_tensor,
    make_optimizer,
    parameter_groups,
    set_schedules,
)
from narrows.ssl.schedules import (
    cosine_schedule,
    learning_rate_schedule,
    momentum_schedule,
    teacher_temperature,
    teacher_temperatures,
    weight_decay_schedule,
)


def closed_form(base: float, final: float, epochs: int, iters: int, warmup: int,
                start: float) -> list[float]:
    w, total = warmup * iters, epochs * iters
    values = [start + (base - start) * i / (w - 1) if w > 1 else base for i in range(w)]
    rest = total - w
    values += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest))
               for i in range(rest)]
    return values


def test_cosine_schedule_closed_form_and_landmarks() -> None:
    s = cosine_schedule(2.0, 0.1, epochs=5, iters_per_epoch=4, warmup_epochs=1, start_warmup=0.5)
    assert len(s) == 20
    assert torch.allclose(s, torch.tensor(closed_form(2.0, 0.1, 5, 4, 1, 0.5),
                                          dtype=torch.float64))
    assert float(s[0]) == 0.5 and float(s[3]) == pytest.approx(2.0)  # warm-up endpoints
    assert float(s[4]) == pytest.approx(2.0)  # the cosine starts at the peak
    assert float(s[4 + 8]) == pytest.approx((2.0 + 0.1) / 2)  # its midpoint (16 cosine steps)
    assert all(float(a) >= float(b) for a, b in zip(s[4:], s[5:], strict=False))
    assert float(s[-1]) > 0.1
    no_warmup = cosine_schedule(1.0, 0.0, 3, 2)
    assert float(no_warmup[0]) == 1.0 and len(no_warmup) == 6


def test_warmup_longer_than_the_run_is_clamped() -> None:
    s = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=3, warmup_epochs=5)
    long = cosine_schedule(1.0, 0.0, epochs=9, iters_per_epoch=3, warmup_epochs=5)
    assert len(s) == 6
    assert torch.allclose(s, torch.arange(6, dtype=torch.float64) / 14)
    assert torch.equal(s, long[:6])  # the first epochs are those of a long run
    assert len(cosine_schedule(1.0, 0.0, epochs=0, iters_per_epoch=3, warmup_epochs=5)) == 0
    equal = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=3, warmup_epochs=2)
    assert float(equal[-1]) == pytest.approx(1.0)


def test_teacher_temperatures() -> None:
    full = teacher_temperatures(40, 0.04, 0.07, 30)
    assert len(full) == 40
    assert torch.allclose(full[:30], 0.04 + 0.03 * torch.arange(30, dtype=torch.float64) / 29)
    assert torch.allclose(full[29:], torch.full((11,), 0.07, dtype=torch.float64))
    short = teacher_temperatures(10, 0.04, 0.07, 30)  # epochs < warm-up: no crash, same slope
    assert torch.equal(short, full[:10])
    assert torch.allclose(teacher_temperatures(3, 0.04, 0.07, 0),
                          torch.full((3,), 0.07, dtype=torch.float64))
    assert [teacher_temperature(e, 0.04, 0.07, 30) for e in range(40)] == full.tolist()


def test_lr_wd_and_momentum_schedules() -> None:
    lr = learning_rate_schedule(0.002, 1e-5, epochs=4, iters_per_epoch=5, warmup_epochs=2)
    assert float(lr[0]) == 0.0 and float(lr[9]) == pytest.approx(0.002)
    assert torch.allclose(lr, torch.tensor(closed_form(0.002, 1e-5, 4, 5, 2, 0.0),
                                           dtype=torch.float64))
    wd = weight_decay_schedule(0.04, 0.1, epochs=2, iters_per_epoch=5)
    assert float(wd[0]) == pytest.approx(0.04)
    assert float(wd[5]) == pytest.approx(0.07)  # midpoint of 10 cosine steps
    m = momentum_schedule(0.996, epochs=2, iters_per_epoch=4)
    expected = [1 - (1 - 0.996) * (1 + math.cos(math.pi * i / 8)) / 2 for i in range(8)]
    assert torch.allclose(m, torch.tensor(expected, dtype=torch.float64))


# ---- optimiser pieces ---------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Module()
        self.head.last_layer = nn.Linear(3, 5, bias=False)
        self.head.weight_g = nn.Parameter(torch.ones(5, 1))
        self.head.frozen_g = nn.Parameter(torch.ones(5, 1), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.last_layer(self.norm(self.proj(x + self.cls_token[0, 0]))) * self.scale


def test_parameter_groups() -> None:
    groups = parameter_groups(Tiny())
    assert groups[0]["regularised"] and not groups[1]["regularised"]
    assert set(groups[0]["names"]) == {"cls_token", "proj.weight", "head.last_layer.weight",
                                       "head.weight_g"}
    assert set(groups[1]["names"]) == {"proj.bias", "norm.weight", "norm.bias", "scale"}
    assert groups[1]["weight_decay"] == 0.0
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_make_optimizer_and_set_schedules() -> None:
    model = Tiny()
    for name, kind in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lars", LARS)):
        opt = make_optimizer(name, parameter_groups(model), lr=0.1)
        assert isinstance(opt, kind)
        set_schedules(opt, lr=0.5, wd=0.07)
        assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.07, 0.0]
    assert make_optimizer("sgd", parameter_groups(model), 0.1).param_groups[0]["momentum"] == 0.9
    with pytest.raises(UserError):
        make_optimizer("adam", parameter_groups(model), 0.1)


def with_grads(seed: int) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    (model(torch.randn(6, 4)) ** 2).sum().mul(50).backward()
    return model


def test_clip_per_tensor_matches_torch_per_tensor() -> None:
    model = with_grads(0)
    ref = with_grads(0)
    before = [float(p.grad.norm()) for p in model.parameters() if p.grad is not None]
    clip = sorted(before)[len(before) // 2]  # some tensors clipped, some not
    norms = clip_per_tensor(model, clip).tolist()
    assert norms == pytest.approx(before, rel=1e-6)
    for p in ref.parameters():
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_([p], clip)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-6), name
            assert float(p.grad.norm()) <= clip * (1 + 1e-5)
    untouched = with_grads(0)
    grads = [p.grad.clone() for p in untouched.parameters() if p.grad is not None]
    clip_per_tensor(untouched, 0.0)
    assert all(torch.equal(a, p.grad) for a, p in
               zip(grads, [p for p in untouched.parameters() if p.grad is not None], strict=True))


def test_cancel_last_layer() -> None:
    model = with_grads(1)
    cancel_last_layer(model, epoch=1, freeze_epochs=1)
    assert model.head.last_layer.weight.grad is not None
    cancel_last_layer(model, epoch=0, freeze_epochs=1)
    assert model.head.last_layer.weight.grad is None
    assert model.proj.weight.grad is not None
    # AdamW then skips the tensor, weight decay included
    before = model.head.last_layer.weight.detach().clone()
    opt = make_optimizer("adamw", parameter_groups(model), lr=0.1)
    set_schedules(opt, 0.1, 0.5)
    opt.step()
    assert torch.equal(model.head.last_layer.weight, before)


def test_lars_two_steps_by_hand() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.1}],
               lr=0.5, eta=0.001)
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5, -0.5])
    opt.step()
    # w: update = g + 0.1 w = [0.9, 1.2] (norm 1.5), scaled by 0.001·5/1.5 → [0.0009·... ]
    u1 = torch.tensor([[0.9, 1.2]]) * (0.001 * 5.0 / 1.5)
    w1 = torch.tensor([[3.0, 4.0]]) - 0.5 * u1
    assert torch.allclose(w, w1)
    # b (1-D): neither weight decay nor adaptation
    b1 = torch.tensor([1.0, 2.0]) - 0.5 * torch.tensor([0.5, -0.5])
    assert torch.allclose(b, b1)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([1.0, 1.0])
    opt.step()
    d = torch.tensor([[0.0, 1.0]]) + 0.1 * w1
    u2 = d * (0.001 * w1.norm() / d.norm())
    assert torch.allclose(w, w1 - 0.5 * (0.9 * u1 + u2))
    assert torch.allclose(b, b1 - 0.5 * (0.9 * torch.tensor([0.5, -0.5]) + torch.tensor([1., 1.])))
    zero = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([zero], lr=1.0)
    zero.grad = torch.ones(2, 2)
    opt.step()  # ‖p‖ = 0: no adaptation, plain momentum step
    assert torch.allclose(zero, -torch.ones(2, 2))
