"""Essential features, MI of index sets, the CSG baseline and their commands (spec §6–§8, §11)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score
from tiny import random_subject, seeded_model
from torch import nn

from narrows.cli import main
from narrows.decompose import ClassIndices
from narrows.decompose.csg import (
    Alternate,
    CSGLoss,
    CSGNetwork,
    csg_topk,
    density,
    load_csg,
    project,
    save_csg,
    sparsity,
)
from narrows.decompose.essential import (
    CONDITIONS,
    EssentialResult,
    essential_features,
    noise_draw,
)
from narrows.decompose.mutual_info import mi_table, mis, overlap_scores, pairwise_mi
from narrows.errors import UserError
from narrows.models import ModelCard, load_model, save_model

SHAPES = "shapes:classes=2,size=16,train=16,test=16"


class Pooled(nn.Module):
    """A model with timm's interface whose pooled features are its input ``(B, D, 1, 1)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        h = x.mean(dim=(2, 3))
        return h if pre_logits else self.linear(h)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def planted(classes: int = 3, dim: int = 16, k: int = 2, per_class: int = 4):
    """Class c reads (weight 1) and lights up (value 1, others 0.1) channels k·c .. k·c+k−1."""
    sets = [list(range(k * c, k * c + k)) for c in range(classes)]
    indices = ClassIndices(sets, dim)
    weight = indices.mask().float()
    labels = torch.arange(classes).repeat_interleave(per_class)
    h = torch.full((len(labels), dim), 0.1)
    h[indices.mask()[labels]] = 1.0
    data = list(zip(h[:, :, None, None], labels.tolist(), strict=True))
    return Pooled(weight), data, indices


# -- mutual information (spec §7) ------------------------------------------------------------

def _two(n: int, a: range, b: range) -> torch.Tensor:
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, list(a)] = True
    mask[1, list(b)] = True
    return mask


@pytest.mark.parametrize("n, a, b, expected, tol", [
    (64, range(5), range(5), 0.2741659, 1e-7),          # identical sets: the entropy H(5/64)
    (64, range(5), range(5, 10), 0.0066287, 1e-7),      # disjoint
    (64, range(5), range(4, 9), 0.0065375, 1e-7),       # overlap 1: lower than disjoint
    (64, range(5), range(3, 8), 0.0362872, 1e-7),       # overlap 2
    (64, range(10), range(10, 20), 0.0291029, 1e-7),
    (64, range(20), range(20, 40), 0.1473925, 1e-7),
    (2048, range(50), range(50, 100), 0.000611, 5e-7),
])
def test_pairwise_mi_matches_the_spec_vectors(n, a, b, expected, tol):
    assert float(pairwise_mi(_two(n, a, b))[0, 1]) == pytest.approx(expected, abs=tol)


def test_pairwise_mi_equals_sklearn_on_every_pair():
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 3, 5, 5, 9, 20, 63, 64]
    mask = torch.zeros(len(sizes), 64, dtype=torch.bool)
    for row, k in enumerate(sizes):
        mask[row, torch.randperm(64, generator=gen)[:k]] = True
    mi = pairwise_mi(mask)
    for p in range(len(sizes)):
        for q in range(len(sizes)):
            brute = mutual_info_score(mask[p].numpy(), mask[q].numpy())
            assert float(mi[p, q]) == pytest.approx(brute, abs=1e-12)


def test_overlap_scores_on_disjoint_sets_in_closed_form():
    sets = ClassIndices([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]], 64)
    h = -(5 / 64) * math.log(5 / 64) - (59 / 64) * math.log(59 / 64)
    disjoint = float(pairwise_mi(_two(64, range(5), range(5, 10)))[0, 1])
    scores = overlap_scores(sets)
    assert scores["upstream"] == pytest.approx((3 * h + 6 * disjoint) / 9, abs=1e-12)
    assert scores["no_diagonal"] == pytest.approx(disjoint, abs=1e-12)
    assert scores["jaccard"] == 0.0
    assert scores["union"] == 15.0
    shared = overlap_scores(ClassIndices([[0, 1, 2], [0, 1, 3]], 8))
    assert shared["jaccard"] == pytest.approx(2 / 4)
    assert shared["union"] == 4.0


def test_mi_table_over_k_with_a_random_column():
    ours = ClassIndices([list(range(10 * c, 10 * c + 10)) for c in range(4)], 64)
    table = mi_table({"ours": ours.top}, [2, 5, 10], random_draws=3, seed=1)
    assert set(table.scores) == {"ours", "random"}
    assert [r["k"] for r in table.to_rows()] == [2, 2, 5, 5, 10, 10]
    assert table.scores["ours"][5] == overlap_scores(ours, 5)
    expected = np.mean([overlap_scores(ClassIndices.random(4, 64, 5, seed=1 + d))["upstream"]
                        for d in range(3)])
    assert table.scores["random"][5]["upstream"] == pytest.approx(expected, abs=1e-15)
    text = table.to_markdown("union")
    assert text.splitlines()[0] == "| k | ours | random |"
    assert "| 10 | 40 |" in text


def test_mis_finds_the_class_specific_channel():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(40)
    features = torch.rand(120, 4, generator=gen)
    features[:, 1] += 5.0 * (labels == 2)  # channel 1 tells class 2 apart, the others nothing
    result = mis(features, labels)
    assert result.matrix.shape == (3, 4)
    assert int(np.argmax(result.matrix[2])) == 1
    assert result.matrix[2, 1] > 0.4 > 0.1 > result.matrix[:, [0, 2, 3]].max()
    assert result.score == pytest.approx(float(result.matrix.max(axis=0).mean()))


# -- essential features (spec §6) ------------------------------------------------------------

def test_noise_level_zero_added_leaves_every_count_at_clean():
    model, data, indices = planted()
    result = essential_features(model, data, indices, sigmas=[0.0], mode="add")
    assert result.clean.tolist() == [4, 4, 4]
    for i in range(len(CONDITIONS)):
        assert result.counts[0, :, i].tolist() == result.clean.tolist()


def test_zero_replacement_removes_only_the_influential_channels():
    model, data, indices = planted()
    result = essential_features(model, data, indices, sigmas=[0.0], mode="replace")
    counts = result.to_upstream(0.0)
    for c in ("0", "1", "2"):
        # zeroing I_c leaves logit 0 against 0.2 for the other classes; the rest cannot hurt
        assert counts[c] == {"noise_at_inf": 0, "noise_at_noninf": 4, "noise_at_random": 4,
                             "clean": 4, "images": 4}


def test_random_control_has_the_size_of_i_c_and_avoids_it():
    influential = torch.zeros(64, dtype=torch.bool)
    influential[[3, 9, 17, 40, 41]] = True
    z, control = noise_draw(7, 123, influential)
    assert int(control.sum()) == 5 and not (control & influential).any()
    z2, control2 = noise_draw(7, 123, influential)
    assert torch.equal(z, z2) and torch.equal(control, control2)
    _, other = noise_draw(7, 124, influential)
    assert not torch.equal(control, other)


def test_counts_are_seeded_and_independent_of_the_batch_size(tmp_path):
    model, data, indices = planted(classes=3, dim=16, k=3, per_class=10)
    kwargs = dict(sigmas=[0.3, 1.0], mode="replace", seed=5)
    a = essential_features(model, data, indices, batch_size=4, **kwargs)
    b = essential_features(model, data, indices, batch_size=64, **kwargs)
    assert np.array_equal(a.counts, b.counts)
    assert a.counts[1, :, 0].sum() < a.clean.sum()  # the noise does something
    doc = a.to_upstream()  # σ = 1 is measured, so it is the default level
    assert sorted(doc) == ["0", "1", "2"]
    assert all(isinstance(doc["1"][key], int) for key in ("noise_at_inf", "noise_at_noninf"))
    a.save(tmp_path / "e.json")
    back = EssentialResult.load(tmp_path / "e.json")
    assert np.array_equal(back.counts, a.counts) and back.sigmas == a.sigmas
    assert json.loads((tmp_path / "e.json").read_text())["counts"]["1.0"] == doc
    rows = a.to_rows(per_class=False)
    assert [r["class"] for r in rows] == ["all", "all"]
    assert rows[1]["noise_at_inf"] == int(a.counts[1, :, 0].sum())


def test_essential_refuses_indices_that_do_not_fit():
    model, data, _ = planted(classes=3, dim=16)
    with pytest.raises(UserError, match="indices are for 2 classes"):
        essential_features(model, data, ClassIndices([[0], [1]], 16))
    with pytest.raises(UserError, match="random control"):
        essential_features(model, data, ClassIndices([list(range(9)), [1], [2]], 16))


# -- CSG (spec §8) ---------------------------------------------------------------------------

def test_sparsity_hinge_and_density_by_hand():
    gate = torch.tensor([[0.5, 1.0], [0.0, -0.25]])
    assert float(sparsity(gate, 0.25)) == pytest.approx(0.75)  # |G|_1 1.75 − 0.25·4
    assert float(sparsity(gate, 0.5)) == 0.0  # under the target: no penalty
    assert density(gate) == pytest.approx(0.4375)


def test_projection_official_and_clamp():
    gate = torch.tensor([[0.5, 0.2, -0.2], [0.25, -0.1, -0.1]], dtype=torch.float64)
    assert project(gate.clone(), "official").tolist() == [[1.0, 1.0, 0.0], [0.5, 0.0, 0.0]]
    assert project(gate.clone() * 4, "clamp").tolist() == [[1.0, 0.8, 0.0], [1.0, 0.0, 0.0]]
    assert project(gate.clone(), "none").tolist() == gate.tolist()


def test_gate_topk_largest_and_upstream_smallest():
    gate = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.0], [0.3, 0.2, 0.1, 0.4, 0.5]])
    assert csg_topk(gate, 2).indices == [[1, 3], [4, 3]]  # tie at 0.9: lower id first
    assert csg_topk(gate, 2, "upstream").indices == [[4, 0], [2, 1]]
    with pytest.raises(UserError):
        csg_topk(gate, 6)


def test_alternate_schedule():
    assert [e for e in range(8) if Alternate(2, 1).is_csg(e)] == [1, 3, 5, 7]
    assert [e for e in range(9) if Alternate(3, 1).is_csg(e)] == [2, 5, 8]  # (e+1) % 3 == 0
    assert [e for e in range(16) if Alternate(3, 1, warmup=9).is_csg(e)] == [11, 14]
    with pytest.raises(UserError):
        Alternate(2, 3)


def _csg_setup(clip: str = "clamp"):
    torch.manual_seed(0)
    model, data, _ = planted(classes=3, dim=8, k=2, per_class=2)
    nn.init.normal_(model.linear.weight)
    network = CSGNetwork(model)
    loss = CSGLoss(network, alternate=Alternate(2, 1), clip=clip, lam_l1=1.0,
                   target_density=0.0)
    x = torch.stack([d[0] for d in data])
    y = torch.tensor([d[1] for d in data])
    return network, loss, x, y


def test_csg_forward_and_gradients_per_path():
    network, loss, x, y = _csg_setup()
    z, zg = network(x, y)
    assert torch.allclose(z, network(x))
    with torch.no_grad():
        network.gate.fill_(1.0)
    assert torch.allclose(network(x, y)[1], z)  # an all-ones gate is the ordinary path
    value, logits = loss(network, x, y)  # epoch 0: ordinary path
    value.backward()
    assert network.gate_flat.grad is None and network.net.linear.weight.grad is not None
    assert loss.epoch_metrics()["csg_epoch"] == 0.0
    assert int(network.state_dict()["epochs_done"]) == 1
    network.zero_grad(set_to_none=True)
    value, _ = loss(network, x, y)  # epoch 1: CSG path
    value.backward()
    assert network.gate_flat.grad.abs().sum() > 0
    assert network.net.linear.weight.grad.abs().sum() > 0
    assert network.gate_flat.ndim == 1  # flat: the core optimiser does not decay it


def test_gate_stays_in_unit_interval_after_a_step_with_clipping():
    for clip, inside in (("clamp", True), ("official", True), ("none", False)):
        network, loss, x, y = _csg_setup(clip)
        network.epochs_done.fill_(1)  # a CSG epoch
        optimizer = torch.optim.SGD(network.parameters(), lr=5.0)
        value, _ = loss(network, x, y)
        value.backward()
        optimizer.step()
        assert network.gate.min() < 0  # the raw step leaves [0, 1] ...
        loss(network, x, y)  # ... the constraint applies before the next forward
        metrics = loss.epoch_metrics()  # and before the gate is read or saved
        gate = network.gate.detach()
        assert bool(((gate >= 0) & (gate <= 1)).all()) is inside, clip
        assert metrics["gate_density"] == pytest.approx(density(gate))


def test_csg_checkpoints_round_trip(tmp_path):
    net = seeded_model("resnet20_cifar", num_classes=3)
    card = ModelCard("resnet20_cifar", 3, 3, 16, (0.5,) * 3, (0.25,) * 3)
    network = CSGNetwork(net)
    with torch.no_grad():
        network.gate.copy_(torch.rand(3, 64))
    save_csg(tmp_path / "csg.pt", network, card, {"lam_l1": 0.05})
    loaded = load_csg(tmp_path / "csg.pt")
    assert torch.equal(loaded.gate, network.gate.detach())
    assert torch.equal(loaded.model.linear.weight, net.linear.weight)
    assert isinstance(load_model(tmp_path / "csg.pt").model, nn.Module)  # a plain checkpoint too
    # a training loop's checkpoint of the wrapper (net.* keys, gate_flat, epochs_done)
    torch.save({"state_dict": network.state_dict(), "narrows_card": card.to_dict()},
               tmp_path / "last.pt")
    assert torch.equal(load_csg(tmp_path / "last.pt").gate, loaded.gate)
    # a third-party file: module. prefix, the gate stored (channels, classes) as "csg",
    # a numpy scalar beside the weights, no card
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.csg"] = loaded.gate.t().clone()
    torch.save({"state_dict": state, "best_acc": np.float64(0.88)}, tmp_path / "other.pth")
    other = load_csg(tmp_path / "other.pth", name="resnet20_cifar")
    assert torch.equal(other.gate, loaded.gate)
    save_model(tmp_path / "plain.pt", net, card)
    with pytest.raises(UserError, match="no CSG gate"):
        load_csg(tmp_path / "plain.pt")


# -- command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A ResNet-20 checkpoint for 2-class 16-px shapes and its top-|W| indices."""
    root = tmp_path_factory.mktemp("subject")
    net, card = random_subject(SHAPES, class_names=True)
    save_model(root / "model.pt", net, card)
    ClassIndices.top_weights(net.linear, 5).save(root / "ind5.json")
    ClassIndices.top_weights(net.linear, 10).save_upstream(root / "ind10.json")
    return root


def _run(args, capsys) -> tuple[int, str, str]:
    code = main(args + ["--no-progress", "--threads", "2", "--device", "cpu"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_csg_train_essential_and_mutual_info(subject, tmp_path, capsys):
    csg_args = ["decompose", "csg-train", "--checkpoint", str(subject / "model.pt"),
                "--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--out",
                str(tmp_path / "csg")]
    code, out, err = _run(csg_args, capsys)
    assert code == 0, err
    assert "CSG-path epochs: 2" in out
    rows = [json.loads(line) for line in (tmp_path / "csg/metrics.jsonl").read_text().splitlines()]
    assert [r["csg_epoch"] for r in rows] == [0.0, 1.0]
    assert rows[1]["gate_density"] < 0.5 == rows[0]["gate_density"]
    assert ClassIndices.load(tmp_path / "csg/indices_csg.json").k == 5
    assert (tmp_path / "csg/gate.png").is_file()
    code, out, _ = _run(csg_args, capsys)  # finished: nothing is trained again
    assert code == 0 and "epoch   1/2" not in out

    ess_args = ["decompose", "essential", "--checkpoint", str(subject / "model.pt"),
                "--indices", str(subject / "ind5.json"), "--csg-checkpoint",
                str(tmp_path / "csg/csg.pt"), "--csg-order", "both", "--sigma", "0", "1",
                "--out", str(tmp_path / "ess")]
    code, out, err = _run(ess_args, capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "ess/results_essential_features.json").read_text())
    assert list(doc) == ["ours", "csg", "csg-upstream"]
    assert sorted(doc["ours"]) == ["0", "1"]
    assert sum(doc["ours"][c]["images"] for c in doc["ours"]) == 16
    for name in ("essential.csv", "essential.md", "essential.png"):
        assert (tmp_path / "ess" / name).is_file()
    code, out, _ = _run(ess_args, capsys)
    assert code == 0 and out.count("reusing") == 3

    code, out, err = _run(["decompose", "mutual-info", "--checkpoint", str(subject / "model.pt"),
                           "--indices", str(subject / "ind5.json"), str(subject / "ind10.json"),
                           "--csg-checkpoint", str(tmp_path / "csg/csg.pt"), "--mis",
                           "--out", str(tmp_path / "mi")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "mi/mutual_info.json").read_text())
    assert doc["ks"] == [5, 10] and set(doc["scores"]) == {"ours", "csg", "random"}
    ours5 = ClassIndices.load(subject / "ind5.json")
    assert doc["scores"]["ours"]["5"]["upstream"] == pytest.approx(
        overlap_scores(ours5)["upstream"])
    assert set(doc["mis"]) == {"ours", "csg"}
    assert (tmp_path / "mi/mutual_info.png").is_file()


def test_cli_errors_are_one_line(subject, tmp_path, capsys):
    model = str(subject / "model.pt")
    (tmp_path / "three.json").write_text(json.dumps({"0": [1], "1": [2], "2": [3]}))
    (tmp_path / "wide.json").write_text(json.dumps({"0": [1], "1": [70]}))
    cases = [
        (["decompose", "essential", "--checkpoint", model, "--indices",
          str(tmp_path / "three.json")], "3 classes, but the model has 2"),
        (["decompose", "essential", "--checkpoint", model, "--indices",
          str(tmp_path / "wide.json")], "outside [0, 64)"),
        (["decompose", "essential", "--checkpoint", model], "nothing to test"),
        (["decompose", "essential", "--checkpoint", model, "--indices",
          str(subject / "ind5.json"), "--k", "7"], "fewer than k = 7"),
        (["decompose", "essential", "--checkpoint", model, "--indices",
          str(subject / "ind5.json"), "--sigma", "1", "1"], "distinct"),
        (["decompose", "essential", "--csg-checkpoint", model, "--data", SHAPES],
         "no CSG gate"),
        (["decompose", "mutual-info", "--indices", str(subject / "ind10.json")],
         "feature width D"),
        (["decompose", "mutual-info", "--indices", str(subject / "ind5.json"), "--ks", "80"],
         "more than the 64 channels"),
    ]
    for args, message in cases:
        code, _, err = _run(args + ["--out", str(tmp_path / "out")], capsys)
        assert code == 2, args
        assert message in err and err.count("\n") == 1, err
