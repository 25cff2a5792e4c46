"""Decompose core: histograms by brute force, the decomposed head's identities, indices files,
fine-tuning gradients and checkpoints, strict upstream loading, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import seeded_model, uint8_images
from torch import nn

from narrows.cli import main
from narrows.data import DataBundle, DataInfo, TensorImageDataset
from narrows.data.streaming import Streaming
from narrows.decompose import (
    ClassIndices,
    DecomposedLinear,
    Extraction,
    TopKHistogram,
    accuracy_curve,
    decompose,
    extract,
    extract_fractional,
    features_at,
    finetune,
    finetune_settings,
    load_decomposed,
    split_head,
    validate,
)
from narrows.decompose.extract import count
from narrows.errors import UserError
from narrows.models import ModelCard, create, load_model, save_model
from narrows.runs import RunDir
from narrows.training import Normalizer

TINY = "shapes:classes=3,size=16,train=24,test=12"
QUIET = ["--no-progress", "--threads", "2", "--device", "cpu"]


# -- brute-force references ---------------------------------------------------------------------
def brute_counts(h: torch.Tensor, labels: torch.Tensor, classes: int, k: int) -> torch.Tensor:
    """Per image: channels by (-value, id), the first k positive ones counted."""
    out = torch.zeros(classes, h.shape[1], dtype=torch.int64)
    for row, c in zip(h.tolist(), labels.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        for j in [j for j in order if row[j] > 0][:k]:
            out[c, j] += 1
    return out


def brute_below(h: torch.Tensor, t: float) -> list[int]:
    """Upstream's n_i(t) = ((cumsum of sorted normalised responses) < t).sum() per image."""
    values = np.sort(h.double().numpy(), axis=1)[:, ::-1]
    share = values / values.sum(axis=1, keepdims=True)
    return list((share.cumsum(axis=1) < t).sum(axis=1))


def ties_and_zeros(n: int = 40, d: int = 12, classes: int = 3, seed: int = 0):
    """Non-negative responses on a coarse grid (many ties), some zeros, one all-zero image."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(0, 4, (n, d), generator=gen).double()
    h[0] = 0.0
    h[1] = 1.0  # every channel tied
    labels = torch.randint(0, classes, (n,), generator=gen)
    return h, labels


def feed(hist: TopKHistogram, h: torch.Tensor, labels: torch.Tensor, chunk: int) -> None:
    for start in range(0, h.shape[0], chunk):
        hist.update(h[start : start + chunk], labels[start : start + chunk])


# -- histograms ---------------------------------------------------------------------------------
def test_histogram_equals_brute_force_for_every_k_and_any_batching():
    h, labels = ties_and_zeros()
    ks = [1, 3, 5, 12]
    one = TopKHistogram(3, 12, ks, k_mass=3, thresholds=[0.5, 0.9])
    feed(one, h, labels, 40)
    split = TopKHistogram(3, 12, ks, k_mass=3, thresholds=[0.5, 0.9])
    feed(split, h, labels, 7)
    ex = Extraction.from_state(one.state_dict(), 3, 3)
    for k in ks:
        assert torch.equal(ex.counts(k), brute_counts(h, labels, 3, k))
    assert torch.equal(one.buckets, split.buckets) and torch.equal(one.below, split.below)
    assert one.images.tolist() == torch.bincount(labels, minlength=3).tolist()
    assert int(one.dead.sum()) == 1  # the all-zero image
    with pytest.raises(UserError, match="per-image k"):
        ex.counts(4)


def test_mass_and_selectivity_equal_brute_force():
    gen = torch.Generator().manual_seed(1)
    h = torch.rand(30, 16, generator=gen, dtype=torch.float64) ** 3
    labels = torch.arange(30) % 2
    hist = TopKHistogram(2, 16, [4], k_mass=4, thresholds=[0.5, 0.75])
    hist.update(h, labels)
    ex = Extraction.from_state(hist.state_dict(), 4, 4)
    share = np.sort(h.numpy(), axis=1)[:, ::-1] / h.numpy().sum(axis=1, keepdims=True)
    for c in range(2):
        rows = labels.numpy() == c
        assert ex.mean_mass()[c].item() == pytest.approx(share[rows, :4].sum(axis=1).mean(), 1e-12)
        for t in (0.5, 0.75):
            below = np.array(brute_below(h[torch.from_numpy(rows)], t))
            median, mean = ex.psi(t)
            assert median[c].item() == (16 - np.median(below)) / 16
            assert mean[c].item() == pytest.approx((16 - below.mean()) / 16, abs=1e-12)


def test_known_class_channels_are_recovered():
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(200) % 4
    h = torch.rand(200, 32, generator=gen)
    for c in range(4):
        h[labels == c, 5 * c : 5 * c + 5] += 3.0
    hist = TopKHistogram(4, 32, [5], k_mass=5)
    feed(hist, h, labels, 64)
    ex = Extraction.from_state(hist.state_dict(), 5, 5)
    assert [sorted(row) for row in ex.indices().indices] == [
        list(range(5 * c, 5 * c + 5)) for c in range(4)
    ]
    assert ex.indices().meta["counts"] == [[50] * 5] * 4


def test_ties_go_to_the_lower_id_and_zeros_are_not_counted():
    h = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0, 0.0]])
    hist = TopKHistogram(1, 6, [3], k_mass=3)
    hist.update(h, torch.zeros(2, dtype=torch.int64))
    ex = Extraction.from_state(hist.state_dict(), 3, 3)
    assert ex.counts(3).tolist() == [[1, 1, 1, 0, 1, 0]]  # image 2 has one positive response
    assert ex.indices().indices == [[0, 1, 2]]  # counts tie at 1: lower ids first
    assert ex.ranking().indices == [[0, 1, 2, 4, 3, 5]]


def test_fractional_variant_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(3)
    h = torch.rand(60, 10, generator=gen, dtype=torch.float64) ** 4
    labels = torch.arange(60) % 3
    fraction = 0.5
    first = TopKHistogram(3, 10, [1], thresholds=[fraction])
    first.update(h, labels)
    per_class = Extraction.from_state(first.state_dict(), 1, 1).fractional_k(fraction)
    second = TopKHistogram(3, 10, per_class, k_mass=max(per_class), thresholds=[fraction])
    second.update(h, labels)
    ex = Extraction.from_state(second.state_dict(), max(per_class), max(per_class),
                               {"fraction": fraction})
    for c in range(3):
        rows = h[labels == c]
        k_c = int(np.mean(brute_below(rows, fraction)))
        assert per_class[c] == max(1, k_c)
        counts = brute_counts(rows, torch.zeros(len(rows), dtype=torch.int64), 1, per_class[c])[0]
        order = sorted(range(10), key=lambda j: (-counts[j].item(), j))[::-1]  # ascending
        q = np.array([counts[j].item() for j in order], dtype=float) / counts.sum().item()
        expected = [j for j, s in zip(order, q.cumsum(), strict=True) if s > fraction][::-1]
        assert ex.chosen().indices[c] == expected


# -- a tiny model and data ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model = seeded_model("resnet20_cifar", num_classes=3).eval()
    data = TensorImageDataset(uint8_images(30, 8), torch.arange(30) % 3)
    return model, data, Normalizer((0.5,) * 3, (0.25,) * 3)


def test_streamed_extraction_equals_brute_force_and_resumes(tiny, tmp_path):
    model, data, norm = tiny
    x = norm(torch.stack([data[i][0] for i in range(len(data))]))
    with torch.no_grad():
        h = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(features_at(model, "layer3.2")(x), h)
    ex = extract(model, data, num_classes=3, k=4, ks=[2, 64], normalizer=norm, batch_size=7,
                 progress=False)
    for k in (2, 4, 64):
        assert torch.equal(ex.counts(k), brute_counts(h, data.labels, 3, k))
    # killed after two saved batches, then resumed: the same counts
    features = features_at(model)
    calls = {"n": 0}

    def dying(inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return features(inputs)

    partial = tmp_path / "partial.pt"
    hist = TopKHistogram(3, 64, [4], k_mass=4)
    how = Streaming(batch_size=7, progress=False, resume=partial, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        count(model, dying, data, hist, norm, how)
    resumed = TopKHistogram(3, 64, [4], k_mass=4)
    count(model, features, data, resumed, norm, how)
    assert torch.equal(resumed.buckets[:, :, 0], ex.counts(4)) and not partial.exists()
    # save / load round trip
    ex.save(tmp_path / "ex")
    back = Extraction.load(tmp_path / "ex")
    assert torch.equal(back.buckets, ex.buckets) and back.indices().indices == ex.indices().indices
    assert ClassIndices.load(tmp_path / "ex" / "indices.json", 3, 64).indices == ex.indices().indices
    frac = extract_fractional(model, data, 0.5, num_classes=3, normalizer=norm, progress=False)
    assert frac.chosen().meta["fraction"] == 0.5


# -- the decomposed head ------------------------------------------------------------------------
def test_decomposed_head_is_the_masked_linear_map_and_the_full_layer_at_k_equal_d():
    torch.manual_seed(0)
    linear = nn.Linear(16, 4)
    h = torch.randn(9, 16)
    ragged = ClassIndices([[3, 1], [0, 15, 7], [2], [9, 8, 4, 5]], 16)
    head = DecomposedLinear(linear, ragged)
    masked = F.linear(h, linear.weight * ragged.mask(), linear.bias)
    assert torch.equal(head(h), masked)
    every = ClassIndices([torch.randperm(16).tolist() for _ in range(4)], 16)
    assert torch.equal(DecomposedLinear(linear, every)(h), linear(h))
    assert head.indices.indices == ragged.indices
    with pytest.raises(UserError, match="3 classes, but the model has 4"):
        DecomposedLinear(linear, ClassIndices([[0]] * 3, 16))
    with pytest.raises(UserError, match="32 channels"):
        DecomposedLinear(linear, ClassIndices([[0]] * 4, 32))


def test_k_equal_d_equals_the_full_model_and_curve_points_equal_validate(tiny):
    model, data, norm = tiny
    x = norm(torch.stack([data[i][0] for i in range(8)]))
    ranking = ClassIndices([torch.randperm(64).tolist() for _ in range(3)], 64)
    with torch.no_grad():
        assert torch.equal(decompose(model, ranking)(x), model(x))
    _, linear = split_head(model)
    sources = {"random": lambda k: ClassIndices.random(3, 64, k, 0),
               "top-weights": lambda k: ClassIndices.top_weights(linear, k)}
    curve = accuracy_curve(model, data, sources, [1, 5, 64], normalizer=norm)
    full = validate(model, data, normalizer=norm)
    assert curve.at("random", 64) == curve.at("top-weights", 64) == curve.full == full.top1
    dec = validate(model, data, ClassIndices.top_weights(linear, 5), normalizer=norm)
    assert curve.at("top-weights", 5) == dec.top1
    assert isinstance(split_head(model)[1], nn.Linear)  # decompose copies by default


def test_baselines_are_seeded_and_top_weights_are_the_largest():
    linear = nn.Linear(10, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0, -5, 1, 2, 2, 0, 0, 0, 0, 3]] * 3))
    assert ClassIndices.top_weights(linear, 4).indices[0] == [1, 9, 3, 4]
    a, b = ClassIndices.random(3, 10, 4, seed=7), ClassIndices.random(3, 10, 4, seed=7)
    assert a.indices == b.indices != ClassIndices.random(3, 10, 4, seed=8).indices
    assert all(len(set(r)) == 4 for r in a.indices)


# -- indices files ------------------------------------------------------------------------------
def test_indices_json_round_trip_and_upstream_form(tmp_path):
    ours = ClassIndices([[7, 23, 54, 50, 22], [9, 47, 40, 55, 6]], 64, {"model": "m", "k": 5})
    ours.save(tmp_path / "a.json")
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["format"] == "narrows.decompose.indices/1" and data["model"] == "m"
    assert data["indices"] == {"0": [7, 23, 54, 50, 22], "1": [9, 47, 40, 55, 6]}
    back = ClassIndices.load(tmp_path / "a.json", 2, 64)
    assert back.indices == ours.indices and back.meta == {"model": "m", "k": 5}
    # the bare upstream form: string keys in any order, order within a list kept
    (tmp_path / "up.json").write_text('{"1": [9, 47, 40, 55, 6], "0": [7, 23, 54, 50, 22]}')
    up = ClassIndices.load(tmp_path / "up.json", num_classes=2, num_channels=64)
    assert up.indices == ours.indices and up.k == 5 and up.num_channels == 64
    ours.save_upstream(tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text()) == {
        "0": [7, 23, 54, 50, 22], "1": [9, 47, 40, 55, 6]}
    assert up.top(2).indices == [[7, 23], [9, 47]] and up.union() == {7, 23, 54, 50, 22, 9, 47,
                                                                     40, 55, 6}
    assert up.mask(1).sum(dim=1).tolist() == [1, 1]
    bad = {
        '{"0": [1, 2], "2": [3]}': "every class",
        '{"0": [1, 1]}': "repeats",
        '{"0": [1, 64]}': "outside",
        '{"0": []}': "no indices",
        '{"0": [1.5]}': "non-integer",
        '{"x": [1]}': "not an integer",
        '[1, 2]': "not an object",
    }
    for text, message in bad.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(UserError, match=message):
            ClassIndices.load(tmp_path / "bad.json", num_channels=64)
    with pytest.raises(UserError, match="2 classes, but the model has 10"):
        ClassIndices.load(tmp_path / "up.json", num_classes=10, num_channels=64)
    with pytest.raises(UserError, match="outside \\[0, 32\\)"):
        ClassIndices.load(tmp_path / "up.json", num_classes=2, num_channels=32)
    with pytest.raises(UserError, match="extracted for 64 channels"):
        ClassIndices.load(tmp_path / "a.json", num_classes=2, num_channels=128)


def test_split_head_refuses_other_heads():
    with pytest.raises(UserError, match="no nn.Linear"):
        split_head(nn.Sequential(nn.Flatten(), nn.ReLU()))
    with pytest.raises(UserError, match="not one linear layer"):
        split_head(create("resnet20_cifar", num_classes=0))


# -- fine-tuning and checkpoints ----------------------------------------------------------------
def tiny_bundle(data: TensorImageDataset) -> DataBundle:
    info = DataInfo(spec="tiny", name="tiny", num_classes=3, class_names=("a", "b", "c"),
                    mean=(0.5,) * 3, std=(0.25,) * 3, image_size=8, default_augment="none")
    return DataBundle(info, {"train": lambda augment: data, "test": lambda augment: data})


def test_finetuning_trains_backbone_and_v_not_w_and_checkpoints_record_indices(tiny, tmp_path):
    model, data, norm = tiny
    indices = ClassIndices.random(3, 64, 5, seed=1)
    net = decompose(model, indices).train()
    x, y = norm(torch.stack([data[i][0] for i in range(6)])), data.labels[:6]
    F.cross_entropy(net(x), y).backward()
    head = net.linear
    assert head.V.grad is not None and head.V.grad.abs().sum() > 0
    assert net.conv1.weight.grad.abs().sum() > 0 and net.layer3[2].bn2.weight.grad.abs().sum() > 0
    assert head.full.weight.grad is None and not head.full.weight.requires_grad
    assert head.V.grad[~head.keep].abs().sum() == 0
    # one epoch on the core loop, then a strict reload of what it wrote
    card = ModelCard(architecture="resnet20_cifar", num_classes=3, in_chans=3, input_size=8,
                     mean=(0.5,) * 3, std=(0.25,) * 3, data_spec="tiny")
    run = RunDir.open(tmp_path / "ft", "decompose finetune", {}, {})
    settings = finetune_settings(epochs=1, batch_size=10, lr=1e-3)
    tuned, result = finetune(model, indices, tiny_bundle(data), settings, card=card,
                             device=torch.device("cpu"), run=run, progress=False, log=lambda s: None)
    assert result.epochs == 1 and not torch.equal(tuned.conv1.weight, model.conv1.weight)
    assert torch.equal(tuned.linear.full.weight, model.linear.weight)  # W is never updated
    loaded = load_decomposed(run.file("decomposed.pt"))
    assert loaded.indices.indices == indices.indices and loaded.extra["decompose"]["indices"]
    best = load_decomposed(run.file("best.pt"))
    tuned.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), tuned(x)) and torch.equal(best.model(x), tuned(x))
    with pytest.raises(UserError, match="no decomposed head"):
        load_decomposed(save_model(tmp_path / "plain.pt", model, card))


def test_strict_loading_of_an_upstream_style_checkpoint(tmp_path):
    torch.manual_seed(3)
    net = create("resnet20_cifar")
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"best_prec1": 91.78, "state_dict": state}, tmp_path / "resnet20.th")
    loaded = load_model(tmp_path / "resnet20.th", name="resnet20_cifar")
    assert loaded.extra["best_prec1"] == 91.78
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    del state["module.linear.bias"]
    torch.save({"best_prec1": 91.78, "state_dict": state}, tmp_path / "broken.th")
    with pytest.raises(UserError, match="missing linear.bias"):
        load_model(tmp_path / "broken.th", name="resnet20_cifar")


# -- command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> str:
    return random_checkpoint(TINY)


def test_cli_extract_then_validate(checkpoint, tmp_path, capsys):
    ex = tmp_path / "ex"
    assert main(["decompose", "extract", "--checkpoint", checkpoint, "--k", "3", "--out",
                 str(ex), *QUIET]) == 0
    for name in ("indices.json", "indices_upstream.json", "ranking.json", "histogram.png"):
        assert (ex / name).is_file()
    assert main(["decompose", "extract", "--checkpoint", checkpoint, "--k", "3", "--out",
                 str(ex), *QUIET]) == 0
    assert "already extracted" in capsys.readouterr().out
    va = tmp_path / "va"
    assert main(["decompose", "validate", "--checkpoint", checkpoint, "--indices",
                 str(ex / "indices_upstream.json"), "--extraction", str(ex), "--ks", "1", "3",
                 "64", "--out", str(va), *QUIET]) == 0
    results = json.loads((va / "results.json").read_text())
    curve = results["curve"]
    assert set(curve["top1"]) == {"histogram", "random", "top-weights"}
    assert all(v[-1] == results["full"]["top1"] for v in curve["top1"].values())
    assert curve["top1"]["histogram"][1] == results["decomposed"]["top1"]
    assert (va / "accuracy_vs_k.png").is_file()


def test_cli_errors_are_one_line_with_exit_2(checkpoint, tmp_path, capsys):
    wrong_classes = tmp_path / "ten.json"
    wrong_classes.write_text(json.dumps({str(c): [c, c + 1] for c in range(10)}))
    wrong_channels = tmp_path / "wide.json"
    wrong_channels.write_text(json.dumps({str(c): [c, 100 + c] for c in range(3)}))
    cases = [
        (["validate", "--indices", str(wrong_classes)], "10 classes, but the model has 3"),
        (["finetune", "--indices", str(wrong_channels)], "outside [0, 64)"),
        (["finetune"], "no indices given"),
        (["validate", "--indices", str(tmp_path / "none.json")], "does not exist"),
        (["extract", "--k", "65"], "exceeds the 64 channels"),
        (["extract", "--layer", "layer9"], "has no module 'layer9'"),
    ]
    for i, (args, message) in enumerate(cases):
        argv = ["decompose", args[0], "--checkpoint", checkpoint, *args[1:],
                "--out", str(tmp_path / f"run{i}"), *QUIET]
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
