"""Order losses (spec §3): masks, Δu, L+/L−, BatchNorm modes, the training command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from narrows.cli.app import _load_commands
from narrows.errors import UserError
from narrows.interactions.order_loss import (
    RECIPES,
    OrderLoss,
    negative_entropy,
    players_kept,
)

_load_commands()  # the built-in commands first, so importing ours cannot shadow them
from narrows.cli.interactions_train import (  # noqa: E402
    OrderTrainConfig,
    execute,
    resolve_recipe,
    run_name,
)

C, G, SIZE = 5, 4, 8  # classes, grid, image side: n = 16 players of 2×2 pixels


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, C))


def batch(b: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, SIZE, SIZE, generator=g) + 5.0  # no pixel equals the baseline 0
    return x, torch.randint(0, C, (b,), generator=g)


class Recorder(nn.Module):
    """Wraps a model; keeps every input and the BN/dropout modes seen at each call."""

    def __init__(self, inner: nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.inner, self.fail_at = inner, fail_at
        self.inputs: list[torch.Tensor] = []
        self.bn_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        self.bn_training.append(all(m.training for m in self.modules()
                                    if isinstance(m, nn.modules.batchnorm._BatchNorm)))
        if self.fail_at is not None and len(self.inputs) == self.fail_at:
            raise RuntimeError("boom")
        return self.inner(x)


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, C))


def player_masks(masked: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(B,C,H,W) masked inputs → (B,n) bool: a player is kept when its patch is not ``fill``."""
    p = SIZE // G
    patches = masked.unfold(2, p, p).unfold(3, p, p)  # B,C,G,G,p,p
    kept = (patches != fill).flatten(start_dim=4).all(dim=4).all(dim=1)  # B,G,G
    return kept.flatten(start_dim=1)


def pixel_mask(masks: torch.Tensor) -> torch.Tensor:
    """Our own (B,n) → (B,1,H,W) expansion, independent of PlayerGrid."""
    p = SIZE // G
    return masks.view(-1, 1, G, G).repeat_interleave(p, 2).repeat_interleave(p, 3).float()


# -- masks ----------------------------------------------------------------------------------
def test_masks_are_nested_floor_sized_and_at_the_input_only():
    x, y = batch(8)
    model = Recorder(linear_model())
    OrderLoss("encourage", 0.3, 0.7, G)(model, x, y)
    clean, in_s2, in_s1 = model.inputs
    assert torch.equal(clean, x)
    s2, s1 = player_masks(in_s2), player_masks(in_s1)
    assert (s2.sum(1) == math.floor(0.7 * 16)).all() and (s1.sum(1) == math.floor(0.3 * 16)).all()
    assert (s1 <= s2).all()  # S1 ⊂ S2
    assert len({tuple(r.tolist()) for r in s2}) > 1  # one permutation per image
    keep = pixel_mask(s2).bool()
    assert torch.equal(in_s2, torch.where(keep, x, torch.zeros(())))


def test_zero_baseline_is_black_in_pixel_space():
    x, y = batch(4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    model = Recorder(linear_model())
    OrderLoss("penalize", 0.0, 0.5, G, baseline="zero", mean=mean, std=std)(model, x, y)
    black = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
    assert torch.allclose(model.inputs[2], black.expand_as(x))  # S1 = ∅ for r1 = 0


def test_players_kept_is_the_mathematical_floor():
    assert players_kept(0.57, 100) == 57  # 0.57 * 100 = 56.99999999999999 in floats
    assert [players_kept(r, 256) for r in (0.0, 0.3, 0.5, 0.7, 1.0)] == [0, 76, 128, 179, 256]


# -- Δu and the two losses in closed form on a linear model ---------------------------------
@pytest.mark.parametrize("kind, r1, r2", [("encourage", 0.3, 0.7), ("penalize", 0.0, 0.5),
                                          ("penalize", 0.7, 1.0), ("encourage", 0.0, 1.0)])
def test_linear_model_closed_form(kind, r1, r2):
    x, y = batch()
    model = Recorder(linear_model())
    lin = model.inner[1]
    torch.manual_seed(7)
    loss, logits = OrderLoss(kind, r1, r2, G)(model, x, y)
    s2, s1 = player_masks(model.inputs[1]), player_masks(model.inputs[2])
    with torch.no_grad():
        w, b = lin.weight, lin.bias

        def u(m):  # affine in the mask: W·(x ⊙ m) + b
            return (x * pixel_mask(m)).flatten(1) @ w.T + b

        coef = r2 / r1 if r1 > 0 else 1.0
        du = u(s2) - coef * u(s1)
        if r1 == 0:
            assert torch.allclose(du, (x * pixel_mask(s2)).flatten(1) @ w.T, atol=1e-5)
        clean = x.flatten(1) @ w.T + b
        if kind == "encourage":
            order = -F.log_softmax(du.double(), 1).gather(1, y[:, None]).mean()
        else:
            p = torch.softmax(du.double(), 1)
            order = (p * torch.log(p)).sum(1).mean()
        expected = F.cross_entropy(clean, y) + order
    assert torch.allclose(logits, clean, atol=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_penalize_is_at_most_zero_and_minus_log_c_at_a_flat_delta_u():
    g = torch.Generator().manual_seed(0)
    assert (negative_entropy(torch.randn(50, C, generator=g) * 4) <= 0).all()
    assert negative_entropy(torch.full((3, C), 2.5)).item() == pytest.approx(-math.log(C))
    model = linear_model()
    nn.init.zeros_(model[1].weight)  # u(S) = bias for every S → Δu = 0 when r1 = 0
    x, y = batch()
    loss, _ = OrderLoss("penalize", 0.0, 0.5, G, lam_cls=0.0)(model, x, y)
    assert loss.item() == pytest.approx(-math.log(C), rel=1e-6)


def test_weights_and_lam_order_zero_is_plain_cross_entropy():
    x, y = batch()
    model = linear_model()
    loss, logits = OrderLoss("encourage", 0.3, 0.7, G, lam_order=0.0)(model, x, y)
    assert torch.equal(logits, model(x))
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    torch.manual_seed(3)
    full, _ = OrderLoss("encourage", 0.3, 0.7, G)(model, x, y)
    torch.manual_seed(3)
    weighted, _ = OrderLoss("encourage", 0.3, 0.7, G, lam_cls=0.5, lam_order=2.0)(model, x, y)
    cls = F.cross_entropy(model(x), y)
    assert (weighted - 0.5 * cls).item() == pytest.approx(2 * (full - cls).item(), rel=1e-5)


def test_n_draws_averages_independent_draws():
    x, y = batch()
    model = linear_model()
    one = OrderLoss("encourage", 0.3, 0.7, G, lam_cls=0.0)
    torch.manual_seed(5)
    a, b = one(model, x, y)[0], one(model, x, y)[0]
    assert a.item() != pytest.approx(b.item())
    torch.manual_seed(5)
    two = OrderLoss("encourage", 0.3, 0.7, G, lam_cls=0.0, n_draws=2)(model, x, y)[0]
    assert two.item() == pytest.approx((a.item() + b.item()) / 2, rel=1e-6)


def test_gradients_reach_every_parameter_through_the_order_term():
    x, y = torch.randn(6, 3, SIZE, SIZE), torch.arange(6) % C
    model = bn_net()
    loss, _ = OrderLoss("encourage", 0.3, 0.7, G, lam_cls=0.0)(model, x, y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -- BatchNorm and dropout modes ------------------------------------------------------------
@pytest.mark.parametrize("bn_mode", ["freeze_stats", "eval_for_masked"])
def test_protective_modes_keep_bn_statistics_of_a_clean_step(bn_mode):
    x, y = torch.randn(6, 3, SIZE, SIZE), torch.arange(6) % C
    clean, keep, upstream = bn_net(), bn_net(), bn_net()
    torch.manual_seed(0)
    clean(x)
    OrderLoss("encourage", 0.3, 0.7, G, bn_mode=bn_mode)(keep, x, y)
    OrderLoss("encourage", 0.3, 0.7, G, bn_mode="train")(upstream, x, y)
    bn_c, bn_k, bn_u = clean[1], keep[1], upstream[1]
    assert torch.equal(bn_k.running_mean, bn_c.running_mean)
    assert torch.equal(bn_k.running_var, bn_c.running_var)
    assert bn_k.num_batches_tracked.item() == 1 and bn_u.num_batches_tracked.item() == 3
    assert not torch.allclose(bn_u.running_mean, bn_c.running_mean)


def test_freeze_stats_trains_exactly_as_upstream():
    x, y = torch.randn(6, 3, SIZE, SIZE), torch.arange(6) % C
    grads = []
    for bn_mode in ("train", "freeze_stats"):
        model = bn_net()
        torch.manual_seed(4)
        loss, _ = OrderLoss("penalize", 0.0, 0.5, G, bn_mode=bn_mode)(model, x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l_up, g_up), (l_fr, g_fr) = grads
    assert torch.equal(l_up, l_fr)
    assert all(torch.equal(a, b) for a, b in zip(g_up, g_fr, strict=True))


@pytest.mark.parametrize("bn_mode, seen", [("eval_for_masked", [True, False, False]),
                                           ("freeze_stats", [True, True, True]),
                                           ("train", [True, True, True])])
def test_modes_during_and_after_the_masked_passes(bn_mode, seen):
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.arange(4) % C
    model = Recorder(bn_net()).train()
    OrderLoss("penalize", 0.0, 0.5, G, bn_mode=bn_mode)(model, x, y)
    assert model.bn_training == seen
    assert all(m.training for m in model.modules())  # dropout and BN back in train mode
    assert model.inner[1].track_running_stats


def state_of(model: nn.Module) -> dict[str, tuple[bool, bool]]:
    return {name: (m.training, getattr(m, "track_running_stats", True))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("bn_mode", ["freeze_stats", "eval_for_masked"])
def test_modes_restored_after_an_exception_and_mixed_modes_kept(bn_mode):
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.arange(4) % C
    model = Recorder(bn_net(), fail_at=2).train()
    model.inner[3].eval()  # a mixed state must come back as it was
    before = state_of(model)
    with pytest.raises(RuntimeError, match="boom"):
        OrderLoss("encourage", 0.3, 0.7, G, bn_mode=bn_mode)(model, x, y)
    assert model.bn_training == [True, bn_mode == "freeze_stats"]
    assert state_of(model) == before


# -- validation and metrics -----------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs", [
    (("encourage", 0.7, 0.3, G), {}), (("encourage", 0.5, 0.5, G), {}),
    (("penalize", -0.1, 0.5, G), {}), (("penalize", 0.0, 1.5, G), {}),
    (("reward", 0.0, 0.5, G), {}), (("penalize", 0.0, 0.5, 1), {}),
    (("penalize", 0.0, 0.5, G), {"n_draws": 0}), (("penalize", 0.0, 0.5, G), {"bn_mode": "x"}),
    (("penalize", 0.0, 0.5, G), {"baseline": "zero"}), (("penalize", 0.0, 0.5, G),
                                                        {"baseline": "blur"}),
    (("penalize", 0.0, 0.5, G), {"lam_order": -1.0}),
])
def test_bad_settings_are_user_errors(args, kwargs):
    with pytest.raises(UserError):
        OrderLoss(*args, **kwargs)


def test_grid_that_does_not_divide_the_image_is_a_user_error():
    x, y = batch()
    with pytest.raises(UserError, match="does not divide"):
        OrderLoss("encourage", 0.3, 0.7, 3)(linear_model(), x, y)


def test_epoch_metrics_are_running_means_and_reset():
    x, y = batch()
    model = linear_model()
    loss = OrderLoss("encourage", 0.3, 0.7, G)
    totals = [loss(model, x, y)[0].item() for _ in range(2)]
    metrics = loss.epoch_metrics()
    assert set(metrics) == {"order_loss", "cls_loss", "delta_u_top1"}
    assert metrics["cls_loss"] + metrics["order_loss"] == pytest.approx(sum(totals) / 2, rel=1e-6)
    assert 0.0 <= metrics["delta_u_top1"] <= 1.0
    assert loss.epoch_metrics() == {}


def test_recipes_match_upstream():
    assert RECIPES == {"normal": None, "high": ("penalize", 0.0, 0.5),
                       "mid": ("encourage", 0.3, 0.7), "low": ("penalize", 0.7, 1.0)}


# -- the command ----------------------------------------------------------------------------
def test_recipes_fill_and_contradictions_are_user_errors():
    assert resolve_recipe(OrderTrainConfig(recipe="mid")) == ("encourage", 0.3, 0.7)
    assert resolve_recipe(OrderTrainConfig(recipe="low", r2=1.0)) == ("penalize", 0.7, 1.0)
    assert resolve_recipe(OrderTrainConfig(recipe="normal")) is None
    custom = OrderTrainConfig(loss="penalize", r1=0.2, r2=0.6)
    assert resolve_recipe(custom) == ("penalize", 0.2, 0.6)
    assert run_name(custom, resolve_recipe(custom)) == "penalize_0.2_0.6"
    assert run_name(OrderTrainConfig(recipe="high"), RECIPES["high"]) == "high"
    for bad in (OrderTrainConfig(recipe="high", loss="encourage"),
                OrderTrainConfig(recipe="mid", r1=0.2), OrderTrainConfig(recipe="normal", r2=0.5),
                OrderTrainConfig(loss="encourage", r1=0.3)):
        with pytest.raises(UserError):
            resolve_recipe(bad)
    with pytest.raises(UserError, match="contradicts --recipe high"):
        execute(OrderTrainConfig(recipe="high", loss="encourage", progress=False))


def test_command_line_parses_the_order_options():
    from narrows.cli.app import parse

    command, cfg = parse(["interactions", "train", "--loss", "encourage", "--r1", "0.3",
                          "--r2", "0.7", "--bn-mode", "train", "--n-draws", "2", "--grid", "4"])
    assert command.words == ("interactions", "train")
    assert isinstance(cfg, OrderTrainConfig)
    assert (cfg.loss, cfg.r1, cfg.r2, cfg.bn_mode, cfg.n_draws, cfg.grid) == (
        "encourage", 0.3, 0.7, "train", 2, 4)


def test_command_trains_and_logs_order_metrics(tmp_path):
    out = tmp_path / "r"
    cfg = OrderTrainConfig(data="shapes:classes=2,size=16,train=32,test=16", epochs=1,
                           recipe="high", grid=4, batch_size=16, out=str(out), progress=False)
    assert execute(cfg) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    for key in ("order_loss", "cls_loss", "delta_u_top1"):
        assert math.isfinite(rows[0][key])
    assert rows[0]["order_loss"] <= 0  # penalize: a negative entropy


def test_command_rejects_a_grid_that_does_not_divide_the_images(tmp_path):
    cfg = OrderTrainConfig(data="shapes:classes=2,size=16,train=32,test=16", epochs=1,
                           recipe="mid", grid=5, out=str(tmp_path / "r"), progress=False)
    with pytest.raises(UserError, match="does not divide"):
        execute(cfg)
    assert not (tmp_path / "r").exists()
