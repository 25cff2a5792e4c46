"""Weighted kNN against a brute-force float64 reference written here from the definition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from narrows.errors import UserError
from narrows.ssl.knn import chunk_rows, knn_evaluate, knn_predict, knn_scores, knn_top1, teacher_knn


def reference(train, train_labels, test, test_labels, *, num_classes, ks, temperature):
    """Per k: (votes [n_test, C] float64, top-1, top-5) by sorting every pair in Python."""
    a = train.double() / train.double().norm(dim=1, keepdim=True)
    b = test.double() / test.double().norm(dim=1, keepdim=True)
    sims = (b @ a.T).tolist()
    out = {}
    for k in ks:
        votes, hit1, hit5 = [], 0, 0
        for i, row in enumerate(sims):
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:min(k, len(row))]
            per_class = [[] for _ in range(num_classes)]
            for j in order:
                per_class[int(train_labels[j])].append(math.exp(row[j] / temperature))
            v = [math.fsum(w) for w in per_class]
            ranking = sorted(range(num_classes), key=lambda c: (-v[c], c))
            hit1 += ranking[0] == int(test_labels[i])
            hit5 += int(test_labels[i]) in ranking[:min(5, num_classes)]
            votes.append(v)
        n = len(sims)
        out[k] = (torch.tensor(votes, dtype=torch.float64).reshape(n, num_classes),
                  hit1 / n if n else math.nan, hit5 / n if n else math.nan)
    return out


def random_case(n_train, n_test, num_classes, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_train, dim, generator=g) * 3,
            torch.randint(0, num_classes, (n_train,), generator=g),
            torch.randn(n_test, dim, generator=g),
            torch.randint(0, num_classes, (n_test,), generator=g))


def tied_case(n_train, n_test, num_classes, dim=10, seed=0):
    """Vectors with four entries ±1: normalised entries ±0.5, every cosine an exact multiple of
    1/4 in float32 and float64 -> many exact ties of similarity and of votes; duplicated train
    vectors carry different labels."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        x = torch.zeros(n, dim)
        for row in x:
            row[torch.randperm(dim, generator=g)[:4]] = torch.randint(0, 2, (4,), generator=g) * 2. - 1
        return x

    train = draw(n_train)
    train[n_train // 2:] = train[:n_train - n_train // 2]  # every vector twice
    labels = torch.randint(0, num_classes, (n_train,), generator=g)
    return train, labels, draw(n_test), torch.randint(0, num_classes, (n_test,), generator=g)


def assert_matches(case, *, num_classes, ks, temperature, chunk=None, device="cpu"):
    want = reference(*case, num_classes=num_classes, ks=ks, temperature=temperature)
    train, train_labels, test, test_labels = (t.to(device) for t in case)
    votes = knn_scores(train, train_labels, test, num_classes=num_classes, ks=ks,
                       temperature=temperature, chunk=chunk)
    got = knn_evaluate(train, train_labels, test, test_labels, num_classes=num_classes, ks=ks,
                       temperature=temperature, chunk=chunk)
    for k in ks:
        torch.testing.assert_close(votes[k].cpu(), want[k][0], rtol=1e-5, atol=0)
        for a, b in zip(got[k], want[k][1:], strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12), k


KS = (1, 2, 3, 5, 7, 20, 45, 60, 200)  # classes hold ~10 each; n_train = 45


@pytest.mark.parametrize("n_test", [0, 1, 3, 99, 101])
def test_every_k_and_small_test_sets_match_the_reference(n_test):
    assert_matches(random_case(45, n_test, 4, seed=n_test), num_classes=4, ks=KS,
                   temperature=0.07)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_ties_follow_lower_train_index_then_lower_class(seed):
    case = tied_case(40, 30, 3, seed=seed)
    assert_matches(case, num_classes=3, ks=(1, 2, 3, 4, 6, 10, 39, 40, 41), temperature=0.5)
    # the case really has ties at the k-th neighbour and in the votes
    train, labels, test, _ = case
    sims = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    top = sims.sort(dim=1, descending=True).values
    assert (top[:, 2] == top[:, 3]).any()


def test_ties_at_the_kth_neighbour_in_long_rows_are_resolved_by_train_index():
    # few distinct cosines among 3000 train vectors: topk alone picks arbitrary tie members
    case = tied_case(3000, 4, 5, dim=6, seed=9)
    assert_matches(case, num_classes=5, ks=(10, 50, 300), temperature=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_resolves_ties_like_the_reference():
    assert_matches(tied_case(3000, 7, 5, dim=6, seed=4), num_classes=5, ks=(1, 10, 50, 300),
                   temperature=0.5, device="cuda")
    assert_matches(random_case(45, 101, 4, seed=2), num_classes=4, ks=KS, temperature=0.07,
                   device="cuda", chunk=10)


def test_one_hot_features_give_equal_votes_and_the_lower_class_wins():
    # test image equally close to two train images of classes 2 and 1: equal votes
    train = torch.eye(3)
    labels = torch.tensor([2, 1, 0])
    test = torch.tensor([[1., 1., 0.]])
    votes = knn_scores(train, labels, test, num_classes=3, ks=(2,))[2]
    assert votes[0, 1] == votes[0, 2] > 0 and votes[0, 0] == 0
    assert knn_evaluate(train, labels, test, torch.tensor([1]), num_classes=3, ks=(2,))[2][0] == 1
    assert knn_evaluate(train, labels, test, torch.tensor([2]), num_classes=3, ks=(2,))[2][0] == 0
    # k = 1 with the tie: the lower train index (class 2) is the neighbour
    assert knn_evaluate(train, labels, test, torch.tensor([2]), num_classes=3, ks=(1,))[1][0] == 1


def test_chunk_of_one_row_equals_one_chunk_and_memory_sets_the_chunk():
    train, labels, test, _ = tied_case(30, 17, 4, seed=5)
    one = knn_scores(train, labels, test, num_classes=4, ks=(3, 8), chunk=1)
    whole = knn_scores(train, labels, test, num_classes=4, ks=(3, 8), chunk=10_000)
    for k in (3, 8):
        assert torch.equal(one[k], whole[k])
    assert chunk_rows(1_281_167, 512) == 104
    assert chunk_rows(10**12, 1) == 1


def test_top5_with_three_classes_counts_every_label():
    case = random_case(20, 25, 3, seed=3)
    got = knn_evaluate(*case, num_classes=3, ks=(5,))
    assert got[5][1] == 1.0
    assert_matches(case, num_classes=3, ks=(5,), temperature=0.07)


def test_bad_k_and_temperature_are_user_errors():
    case = random_case(5, 2, 2)
    with pytest.raises(UserError):
        knn_scores(case[0], case[1], case[2], num_classes=2, ks=(0,))
    with pytest.raises(UserError):
        knn_scores(case[0], case[1], case[2], num_classes=2, ks=(3,), temperature=0.0)
    with pytest.raises(UserError, match="no training features"):
        knn_evaluate(case[0][:0], case[1][:0], case[2], case[3], num_classes=2, ks=(3,))


def old_top1(train, train_labels, test, test_labels, *, num_classes, k, temperature):
    """The kNN the trainer used before (topk, float32 votes, argmax)."""
    train = nn.functional.normalize(train, dim=1)
    test = nn.functional.normalize(test, dim=1)
    top, index = (test @ train.T).topk(min(k, train.shape[0]), dim=1)
    votes = torch.zeros(test.shape[0], num_classes)
    votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
    return (votes.argmax(1) == test_labels).float().mean().item()


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)

    def backbone_features(self, x):
        return {"cls": self.proj(x), "cls+": -self.proj(x)}


def test_trainer_knn_values_are_unchanged():
    torch.manual_seed(0)
    train, labels, test, test_labels = random_case(60, 40, 5, dim=6, seed=7)
    for k in (1, 5, 20, 100):
        assert knn_top1(train, labels, test, test_labels, num_classes=5, k=k,
                        temperature=0.07) == pytest.approx(
            old_top1(train, labels, test, test_labels, num_classes=5, k=k, temperature=0.07))
    scores = knn_predict(train, labels, test, num_classes=5, k=20, chunk=7)
    assert scores.dtype == torch.float32 and scores.shape == (40, 5)
    model = Encoder().train()
    batches = lambda x, y: [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]  # noqa: E731
    got = teacher_knn(model, batches(train, labels), batches(test, test_labels),
                      prepare=lambda x: x, num_classes=5)
    with torch.no_grad():
        want = old_top1(model.proj(train), labels, model.proj(test), test_labels, num_classes=5,
                        k=20, temperature=0.07)
    assert got == pytest.approx(want) and model.training


# -- the orchestrator on a tiny random ViT --------------------------------------------------
DATA = "shapes:classes=3,size=32,train=40,test=13"


def tiny_backbone(tokens: int):
    from narrows.ssl.backbones import load_eval_backbone
    from tests.tiny import SSL_TINY, SSL_VIT

    return load_eval_backbone(model=SSL_VIT, model_kwargs=dict(SSL_TINY), class_tokens=tokens,
                              image_size=32, seed=3)


def hand_features(backbone, dataset):
    """cls, cls+ and avgpool from timm's forward_features (final norm applied), by hand."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    n_c = backbone.num_class_tokens
    with torch.no_grad():
        tokens = backbone.vit.eval().forward_features((x - mean) / std)
    parts = {"cls": tokens[:, 0], "avgpool": tokens[:, n_c:].mean(1)}
    if n_c == 2:
        parts["cls+"] = tokens[:, 1]
        parts["cls|cls+"] = torch.cat([tokens[:, 0], tokens[:, 1]], 1)
    return parts, y


def test_evaluate_knn_equals_knn_on_features_computed_by_hand(tmp_path):
    from narrows.data.specs import load
    from narrows.plotting import pyplot
    from narrows.ssl.eval_options import KNNOptions
    from narrows.ssl.knn_eval import KNNResult, evaluate_knn

    data = load(DATA)
    backbone = tiny_backbone(2)
    options = KNNOptions(k=[1, 5, 20, 200], temperature=0.1)
    result = evaluate_knn(backbone, data, options, cache=tmp_path / "cache", say=None)
    train, y_train = hand_features(backbone, data.split("train", "none"))
    test, y_test = hand_features(backbone, data.test())
    assert result.features == ["cls", "cls+", "cls|cls+", "avgpool"]
    for feature in result.features:
        want = reference(train[feature], y_train, test[feature], y_test, num_classes=3,
                         ks=(1, 5, 20, 200), temperature=0.1)
        for k in (1, 5, 20, 200):
            row = next(r for r in result.rows if r["feature"] == feature and r["k"] == k)
            assert (row["top1"], row["top5"]) == pytest.approx(want[k][1:], abs=1e-12)
            assert (row["n_train"], row["n_test"]) == (40, 13) and row["top5"] == 1.0
    again = evaluate_knn(backbone, data, options, cache=tmp_path / "cache", say=None)
    assert again.rows == result.rows and again.provenance["compute"]["features_from_cache"]
    # the result contract
    path = result.save(tmp_path / "knn.json")
    import json

    assert json.loads(path.read_text())["format"] == "narrows.ssl.knn/1"
    assert KNNResult.load(path).to_rows() == result.to_rows()
    assert "\n" not in result.summary() and "k=20" in result.summary()
    assert result.table().count("\n") == 2 + 4
    fig, ax = result.plot()
    pyplot().close(fig)
    fig, ax0 = pyplot().subplots()
    assert result.plot(ax=ax0) == (fig, ax0)
    pyplot().close(fig)


def test_one_token_models_drop_cls_plus_with_a_note():
    from narrows.ssl.eval_options import KNNOptions
    from narrows.ssl.knn_eval import evaluate_knn

    notes = []
    result = evaluate_knn(tiny_backbone(1), DATA, KNNOptions(k=[3]), say=notes.append)
    assert result.features == ["cls", "avgpool"]
    assert sum("cls+" in n for n in notes) == 2
    with pytest.raises(UserError):
        evaluate_knn(tiny_backbone(1), DATA, KNNOptions(features=["cls+"], k=[3]), say=None)


TORCHRUN_SCRIPT = '''
import json, sys
import torch
from narrows.runtime import init_distributed, shutdown_distributed
from narrows.ssl.eval_options import KNNOptions
from narrows.ssl.knn_eval import evaluate_knn
from tests.ssl.test_ssl_knn import DATA, tiny_backbone

dist = init_distributed(torch.device("cpu"))
result = evaluate_knn(tiny_backbone(2), DATA, KNNOptions(k=[1, 5, 20]), cache=sys.argv[1],
                      dist=dist, say=None)
if dist.is_main:
    result.save(sys.argv[2])
shutdown_distributed()
'''


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    """gloo, 2 ranks each scoring half the test images (hits summed) == 1 process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from narrows.ssl.eval_options import KNNOptions
    from narrows.ssl.knn_eval import KNNResult, evaluate_knn

    script = tmp_path / "knn_run.py"
    script.write_text(TORCHRUN_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), str(tmp_path / "cache"),
                           str(tmp_path / "two.json")],
                          capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = KNNResult.load(tmp_path / "two.json")
    one = evaluate_knn(tiny_backbone(2), DATA, KNNOptions(k=[1, 5, 20]), say=None)
    assert two.to_rows() == one.to_rows()
