"""Fine-tuning recipes of the core loop: layer-wise lr decay, warm-up/min-lr, mixup/cutmix,
RandAugment/random erasing, drop path; the defaults leave the plain loop as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from tiny import one_torch_thread

from narrows.errors import UserError
from narrows.models import ModelCard
from narrows.runs import RunDir
from narrows.training import TrainSettings, fit, learning_rate, make_optimizer
from narrows.training.batches import Normalizer
from narrows.training.loop import train_one_epoch
from narrows.training.recipes import layer_decay_groups, mixup_loss, train_transform
from narrows.training.setup import prepare_training

TINY_VIT = dict(patch_size=8, embed_dim=48, num_heads=3, img_size=32)
DATA = "shapes:classes=3,size=32,train=24,test=8"


@pytest.fixture(autouse=True)
def one_thread():
    yield from one_torch_thread()


def _vit(depth: int, reg_tokens: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=depth,
                             reg_tokens=reg_tokens, **TINY_VIT)


def _expected_id(name: str, depth: int) -> int:
    """The spec's table (udi.md §9.3), written out independently of the library."""
    if name in ("cls_token", "reg_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    for i in range(depth):
        if name.startswith(f"blocks.{i}."):
            return i + 1
    assert name.startswith(("norm.", "head.")), name
    return depth + 1


@pytest.mark.parametrize("depth", [2, 12])
def test_layer_decay_scales_follow_the_beit_table(depth):
    vit = _vit(depth)
    decay = 0.55
    groups = layer_decay_groups(vit, weight_decay=0.05, layer_decay=decay)
    where = {id(p): g for g in groups for p in g["params"]}
    names = dict(vit.named_parameters())
    assert len(where) == len(names)  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(names)
    for name, param in names.items():
        group = where[id(param)]
        assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - _expected_id(name, depth)),
                                                  rel=1e-12), name
        no_decay = param.ndim <= 1 or name in ("pos_embed", "cls_token", "reg_token")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert where[id(vit.reg_token)]["lr_scale"] == where[id(vit.patch_embed.proj.weight)][
        "lr_scale"]
    for name in ("head.weight", "head.bias", "norm.weight", "norm.bias"):
        assert where[id(names[name])]["lr_scale"] == 1.0
    if depth == 12:  # the spec's number: patch_embed learns at 0.55^13 ≈ 4.2e-4 of the lr
        assert where[id(vit.patch_embed.proj.weight)]["lr_scale"] == pytest.approx(4.2e-4,
                                                                                   rel=0.02)


def test_every_step_sets_each_groups_lr_times_its_scale():
    vit = _vit(2)
    settings = TrainSettings(epochs=3, optimizer="adamw", lr=1e-3, layer_decay=0.5,
                             warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05)
    optimizer = make_optimizer(vit, settings)
    assert {g["lr_scale"] for g in optimizer.param_groups} == {0.125, 0.25, 0.5, 1.0}
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 3]))
               for _ in range(3)]
    train_one_epoch(vit, batches, optimizer, settings, 1, Normalizer((0.5,) * 3, (0.5,) * 3),
                    torch.device("cpu"), lambda m, x, y: (F.cross_entropy(m(x), y), m(x)))
    last = learning_rate(settings, 1 + 2 / 3)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(last * group["lr_scale"], rel=1e-12)


def test_defaults_keep_the_plain_optimizer_and_schedule():
    vit = _vit(2)
    settings = TrainSettings(epochs=10, lr=0.3, warmup_epochs=2)
    groups = make_optimizer(vit, settings).param_groups
    assert len(groups) == 2 and all("lr_scale" not in g for g in groups)
    assert [len(g["params"]) for g in groups] == [
        sum(p.ndim > 1 for p in vit.parameters()), sum(p.ndim <= 1 for p in vit.parameters())]
    for progress in np.linspace(0, 10, 41):  # the formulas before warmup_lr/min_lr, bit for bit
        if progress < 2:
            old = 0.3 * progress / 2
        else:
            old = 0.3 * 0.5 * (1.0 + math.cos(math.pi * min((progress - 2) / 8, 1.0)))
        assert learning_rate(settings, float(progress)) == old


def test_warmup_starts_at_warmup_lr_and_cosine_ends_at_min_lr():
    s = TrainSettings(epochs=10, lr=1e-3, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    assert learning_rate(s, 0.0) == pytest.approx(1e-6)
    assert learning_rate(s, 1.0) == pytest.approx((1e-6 + 1e-3) / 2)
    assert learning_rate(s, 2.0) == pytest.approx(1e-3)
    assert learning_rate(s, 6.0) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way down the cosine
    assert learning_rate(s, 10.0) == pytest.approx(1e-5)
    after = [learning_rate(s, p) for p in np.linspace(2, 10, 33)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert min(after) == pytest.approx(1e-5)


def _uniform_model(classes: int):
    """Zero logits whatever the input: the soft cross-entropy is then log(C) · Σ targets."""
    weight = torch.zeros(classes, requires_grad=True)

    def model(x):
        return weight.expand(x.shape[0], classes) * 1.0

    return model


@pytest.mark.parametrize("batch", [8, 7])
@pytest.mark.parametrize("mix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_targets_sum_to_one_even_for_an_odd_batch(batch, mix):
    classes = 5
    settings = TrainSettings(mixup=mix[0], cutmix=mix[1], label_smoothing=0.1)
    loss_fn = mixup_loss(settings, classes)
    np.random.seed(0)
    x = torch.randn(batch, 3, 8, 8)
    for _ in range(5):
        loss, logits = loss_fn(_uniform_model(classes), x, torch.arange(batch) % classes)
        assert logits.shape == (batch, classes)
        assert loss.item() == pytest.approx(math.log(classes), rel=1e-6)


def test_mixup_equals_an_independent_mix_and_an_odd_batch_is_only_smoothed():
    classes, smooth, alpha = 4, 0.1, 0.8
    settings = TrainSettings(mixup=alpha, cutmix=0.0, label_smoothing=smooth)
    loss_fn = mixup_loss(settings, classes)
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, classes)

    def model(x):
        return lin(x.flatten(1))

    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    np.random.seed(3)
    loss, _ = loss_fn(model, x, y)
    np.random.seed(3)
    assert np.random.rand() < 1.0  # timm: the "is this batch mixed" draw, then lambda
    lam = float(np.random.beta(alpha, alpha))
    mixed = lam * x + (1 - lam) * x.flip(0)
    soft = torch.full((6, classes), smooth / classes)
    soft[torch.arange(6), y] += 1 - smooth
    target = lam * soft + (1 - lam) * soft.flip(0)
    expect = (-target * F.log_softmax(model(mixed), dim=1)).sum(1).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    odd_loss, _ = loss_fn(model, x[:5], y[:5])
    plain = F.cross_entropy(model(x[:5]), y[:5], label_smoothing=smooth)
    assert odd_loss.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.equal(x, x.clone())  # inputs are not mixed in place


def test_train_transform_is_off_by_default_and_erases_a_box():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    assert train_transform(TrainSettings(), mean, std) is None
    erase = train_transform(TrainSettings(random_erasing=1.0), mean, std)
    torch.manual_seed(0)
    image = torch.rand(3, 32, 32)
    out = erase(image.clone())
    changed = (out - image).abs().amax(0) > 1e-4
    assert 0 < changed.sum() < 32 * 32
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    box = torch.zeros_like(changed)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert torch.equal(changed, box)  # one rectangle, the rest untouched
    assert torch.allclose(out[:, ~box], image[:, ~box], atol=1e-6)
    ra = train_transform(TrainSettings(randaugment="rand-m9-mstd0.5-inc1"), mean, std)
    import random

    random.seed(0)
    outs = [ra(image) for _ in range(4)]
    assert all(o.shape == image.shape and 0 <= o.min() and o.max() <= 1 for o in outs)
    assert any(not torch.allclose(o, image, atol=1 / 255) for o in outs)


def test_drop_path_reaches_the_model_or_is_refused():
    model, card, _ = prepare_training(DATA, model="vit_tiny_patch16_224",
                                      model_kwargs={**TINY_VIT, "depth": 2}, drop_path=0.1)
    assert card.model_kwargs["drop_path_rate"] == 0.1
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1])  # timm: linear in depth, up to the rate
    with pytest.raises(UserError, match="drop_path_rate"):
        prepare_training(DATA, model="resnet20_cifar", drop_path=0.1)
    with pytest.raises(UserError, match="disagree"):
        prepare_training(DATA, model="vit_tiny_patch16_224",
                         model_kwargs={"drop_path_rate": 0.2}, drop_path=0.1)


class Interrupt(Exception):
    pass


RECIPE = dict(epochs=2, batch_size=6, optimizer="adamw", lr=1e-3, weight_decay=0.05,
              layer_decay=0.6, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
              randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25, warmup_epochs=1,
              warmup_lr=1e-6, min_lr=1e-6)


def _run(out, stop_after=None):
    from narrows.data import load

    data = load("shapes:classes=3,size=32,train=15,test=4")  # batches 6, 6 and 3 (odd)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=2,
                            drop_path_rate=0.1, **TINY_VIT)
    card = ModelCard(architecture="vit_tiny_patch16_224", num_classes=3, in_chans=3,
                     input_size=32, mean=tuple(data.info.mean), std=tuple(data.info.std),
                     data_spec=DATA, model_kwargs={})

    def stop(epoch, row):
        if stop_after is not None and epoch == stop_after:
            raise Interrupt

    result = fit(vit, data, TrainSettings(**RECIPE), card=card, device=torch.device("cpu"),
                 run=RunDir(out), progress=False, log=lambda s: None, on_epoch_end=stop)
    return vit, result


def test_a_killed_mixup_run_resumes_identically(tmp_path):
    reference, ref_result = _run(tmp_path / "whole")
    with pytest.raises(Interrupt):
        _run(tmp_path / "killed", stop_after=1)
    resumed, result = _run(tmp_path / "killed")
    assert result.resumed_from == 1
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    timing = ("seconds", "images_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in ref_result.metrics] == \
        [{k: v for k, v in r.items() if k not in timing} for r in result.metrics]


def test_mixup_with_a_loss_of_its_own_is_refused():
    from narrows.data import load

    data = load(DATA)
    with pytest.raises(UserError, match="--mixup"):
        fit(_vit(2), data, TrainSettings(mixup=0.8), card=None, device=torch.device("cpu"),
            loss_fn=lambda m, x, y: (F.cross_entropy(m(x), y), m(x)), progress=False)



def test_randaugment_at_the_top_magnitude_posterizes_to_one_bit_not_a_crash():
    import random

    from PIL import Image, ImageOps

    from narrows.training.recipes import _posterize_at_least_one_bit, _randaugment

    asked = []
    kept = _posterize_at_least_one_bit(lambda image, bits, **kw: asked.append(bits) or image)
    kept(None, 0), kept(None, 3)
    assert asked == [1, 3]
    image = Image.new("RGB", (4, 4), (200, 100, 50))
    from timm.data.auto_augment import posterize

    one_bit = _posterize_at_least_one_bit(posterize)(image, 0)
    assert one_bit.tobytes() == ImageOps.posterize(image, 1).tobytes()
    apply = _randaugment("rand-m10-n1-inc1", (0.5, 0.5, 0.5))  # magnitude 10: 4 - 4 = 0 bits
    random.seed(0)
    gray = torch.full((3, 8, 8), 0.8)
    for _ in range(200):  # posterize, one op of 15, is drawn often at magnitude 10
        out = apply(gray)
        assert out.shape == gray.shape and 0 <= out.min() and out.max() <= 1


def test_a_refused_drop_path_is_told_apart_from_other_build_errors():
    from narrows.training.setup import _refused_keyword

    assert _refused_keyword("resnet20_cifar does not take the option(s) foo, drop_path_rate",
                            "drop_path_rate")
    assert _refused_keyword("cannot build vgg11 with drop_path_rate=0.1: VGG.__init__() got an "
                            "unexpected keyword argument 'drop_path_rate'", "drop_path_rate")
    assert not _refused_keyword("cannot build vit with depth='x', drop_path_rate=0.1: "
                                "unsupported operand type(s)", "drop_path_rate")
