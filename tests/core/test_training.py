"""The training loop: schedules, exact resume after an interruption, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from narrows.data import DataBundle, DataInfo, TensorImageDataset, load
from narrows.data.augment import tensor_augmentation
from narrows.models import ModelCard, create
from narrows.runs import RunDir
from narrows.training import Normalizer, TrainSettings, evaluate, fit, learning_rate


def test_cosine_step_and_warmup_schedules():
    s = TrainSettings(epochs=10, lr=0.2, schedule="cosine")
    assert learning_rate(s, 0) == pytest.approx(0.2)
    assert learning_rate(s, 5) == pytest.approx(0.1)
    assert learning_rate(s, 10) == pytest.approx(0.0, abs=1e-12)
    s = TrainSettings(epochs=10, lr=1.0, schedule="step", milestones=[3, 6], gamma=0.1)
    assert [learning_rate(s, e) for e in (0, 2.9, 3, 5.5, 6, 9)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    # upstream np.logspace(log10(0.01), log10(0.01) - 1, 5): one value per epoch
    s = TrainSettings(epochs=5, lr=0.01, schedule="log", log_decades=1.0)
    assert [learning_rate(s, e + 0.5) for e in range(5)] == pytest.approx(
        list(np.logspace(-2, -3, 5)))
    s = TrainSettings(epochs=10, lr=1.0, schedule="cosine", warmup_epochs=2)
    assert learning_rate(s, 1) == pytest.approx(0.5)
    assert learning_rate(s, 2) == pytest.approx(1.0)
    assert learning_rate(s, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def small_digits(n_train: int = 96, n_test: int = 64) -> DataBundle:
    """A slice of digits, so that a few epochs take about a second."""
    full = load("digits")
    train, test = full.train("none"), full.test()
    tr = TensorImageDataset(train.images[:n_train], train.labels[:n_train])
    te = TensorImageDataset(test.images[:n_test], test.labels[:n_test])
    info = full.info

    def factory(base):
        return lambda augment: base.with_transform(tensor_augmentation(
            info.default_augment if augment == "auto" else augment, info.image_size))

    return DataBundle(info, {"train": factory(tr), "test": factory(te)})


def card_for(info: DataInfo) -> ModelCard:
    return ModelCard(architecture="resnet20_cifar", num_classes=10, in_chans=3,
                     input_size=info.image_size, mean=info.mean, std=info.std,
                     class_names=info.class_names, data_spec=info.spec)


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in rows]


class Interrupt(Exception):
    pass


def train_run(out, data, settings, *, interrupt_after_epoch=None, interrupt_at_step=None):
    torch.manual_seed(0)
    model = create("resnet20_cifar", num_classes=10, drop_rate=0.2)
    run = RunDir.open(out, "train", {}, {})
    calls = {"n": 0}

    def on_epoch_end(epoch, row):
        if epoch == interrupt_after_epoch:
            raise Interrupt

    from narrows.training import cross_entropy

    base = cross_entropy()

    def loss_fn(m, x, y):
        calls["n"] += 1
        if calls["n"] == interrupt_at_step:
            raise Interrupt
        return base(m, x, y)

    result = fit(model, data, settings, card=card_for(data.info), device=torch.device("cpu"),
                 run=run, progress=False, log=lambda _: None, on_epoch_end=on_epoch_end,
                 loss_fn=loss_fn)
    return model, result


RESUME_SETTINGS = TrainSettings(epochs=4, batch_size=32, lr=0.05, augment="crop", seed=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run, the reference of both kill points."""
    data = small_digits()
    return data, *train_run(tmp_path_factory.mktemp("ref") / "ref", data, RESUME_SETTINGS)


@pytest.mark.parametrize("where", ["after_epoch", "mid_epoch"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, where, uninterrupted):
    data, reference, ref_result = uninterrupted
    settings = RESUME_SETTINGS

    out = tmp_path / "killed"
    kwargs = ({"interrupt_after_epoch": 2} if where == "after_epoch"
              else {"interrupt_at_step": 3 * 2 + 2})  # 3 steps per epoch: dies inside epoch 3
    with pytest.raises(Interrupt):
        train_run(out, data, settings, **kwargs)
    resumed, result = train_run(out, data, settings)
    assert result.resumed_from == 2
    ref_state, state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key
    rows = RunDir(out).read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert without_timing(rows) == without_timing(ref_result.metrics)
    assert (out / "curves.png").is_file() and (out / "best.pt").is_file()


def test_finished_run_is_not_trained_again(tmp_path):
    data = small_digits(64, 32)
    settings = TrainSettings(epochs=1, batch_size=32, lr=0.05)
    _, first = train_run(tmp_path / "r", data, settings)
    model, again = train_run(tmp_path / "r", data, settings)
    assert again.resumed_from == 1 and again.metrics == first.metrics


def test_seed_changes_the_run(tmp_path):
    data = small_digits(64, 32)
    a, _ = train_run(tmp_path / "a", data, TrainSettings(epochs=1, batch_size=32, seed=0))
    b, _ = train_run(tmp_path / "b", data, TrainSettings(epochs=1, batch_size=32, seed=1))
    assert not torch.equal(a.linear.weight, b.linear.weight)


def test_evaluate_counts_top1_and_top5_exactly():
    class Fixed(torch.nn.Module):
        """Logits that rank class (label + shift) first, so top-k is known in closed form."""

        def forward(self, x):
            labels = x[:, 0, 0, 0].long()
            shift = x[:, 1, 0, 0].long()
            logits = -torch.arange(10.0).repeat(len(x), 1)
            return logits.scatter(1, ((labels + shift) % 10)[:, None], 100.0)

    # shift 0 → top-1 hit; shift 3 → the label is ranked (label) among the rest: compute by hand
    images = torch.zeros(6, 3, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    shifts = [0, 0, 1, 1, 1, 9]
    for i, s in enumerate(shifts):
        images[i, 0] = labels[i]
        images[i, 1] = s
    ds = TensorImageDataset(images, labels)
    result = evaluate(Fixed(), ds, Normalizer([0, 0, 0], [1 / 255, 1 / 255, 1 / 255]),
                      torch.device("cpu"), batch_size=4)
    # expected top-5 by brute force over the same logits
    logits = Fixed()(torch.stack([ds[i][0] * 255 for i in range(6)]))
    top5 = sum(int(labels[i] in logits[i].topk(5).indices) for i in range(6))
    assert result.n == 6
    assert result.top1 == pytest.approx(2 / 6)
    assert result.top5 == pytest.approx(top5 / 6)
