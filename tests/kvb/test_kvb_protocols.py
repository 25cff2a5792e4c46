"""kvb protocols: class-incremental streams and the i.i.d. control, the accuracy matrix and
forgetting, stored embeddings and their metadata, baselines, and 'narrows kvb embed | train'."""

from __future__ import annotations

import json
import math

import pytest
import torch

from narrows.cli import main
from narrows.data.streaming import Streaming
from narrows.errors import UserError
from narrows.kvb.baselines import FitSettings, LinearProbe, MLPProbe, VQBottleneck, ridge
from narrows.kvb.embeddings import (
    EmbeddingMeta,
    Embeddings,
    compute_embeddings,
    data_key,
    embedding_path,
    file_name,
    load_embeddings,
    read_meta,
)
from narrows.kvb.protocols import (
    Phase,
    iid_stream,
    incremental_stream,
    make_tasks,
    per_class_accuracy,
    run_stream,
)
from narrows.kvb.results import ContinualResult, summary_table

TINY = "shapes:classes=4,size=16,train=32,test=16"
QUIET = ["--no-progress", "--threads", "2", "--device", "cpu"]


def labels_of(counts: list[int]) -> torch.Tensor:
    """Labels with ``counts[c]`` samples of class c, interleaved."""
    out = [c for c, n in enumerate(counts) for _ in range(n)]
    return torch.tensor(out)[torch.randperm(len(out), generator=torch.Generator().manual_seed(1))]


# -- streams -----------------------------------------------------------------------------------
def test_tasks_are_seeded_shuffles_cut_into_equal_groups():
    tasks = make_tasks(10, 2, seed=3)
    assert [len(t) for t in tasks] == [2] * 5
    assert sorted(c for t in tasks for c in t) == list(range(10))
    assert make_tasks(10, 2, seed=3) == tasks
    assert make_tasks(10, 2, seed=4) != tasks
    assert make_tasks(6, 3, seed=0, order=[5, 4, 3, 2, 1, 0]) == [[5, 4, 3], [2, 1, 0]]
    with pytest.raises(ValueError, match="cannot be cut"):
        make_tasks(10, 3, seed=0)
    with pytest.raises(ValueError, match="permutation"):
        make_tasks(4, 2, seed=0, order=[0, 0, 1, 2])


def test_incremental_phases_visit_only_their_task_each_sample_epochs_times():
    labels = labels_of([7, 5, 6, 9, 4, 8])
    tasks = make_tasks(6, 2, seed=0)
    stream = incremental_stream(labels, tasks, epochs=3, seed=0)
    assert len(stream.phases) == 3
    for phase, classes in zip(stream.phases, tasks, strict=True):
        order = phase.order()
        assert set(labels[order].tolist()) == set(classes)  # no leakage of other classes
        members = (labels.unsqueeze(0) == torch.tensor(classes).unsqueeze(1)).any(0)
        counts = torch.bincount(order, minlength=len(labels))
        assert (counts[members] == 3).all() and (counts[~members] == 0).all()
    again = incremental_stream(labels, tasks, epochs=3, seed=0)
    assert torch.equal(again.phases[1].order(), stream.phases[1].order())
    other = incremental_stream(labels, tasks, epochs=3, seed=1)
    assert not torch.equal(other.phases[1].order(), stream.phases[1].order())


def test_iid_control_has_the_incremental_visit_counts_and_sees_every_class():
    labels = labels_of([7, 5, 6, 9, 4, 8])
    tasks = make_tasks(6, 2, seed=0)
    inc = incremental_stream(labels, tasks, epochs=4, seed=0)
    iid = iid_stream(labels, tasks, epochs=4, seed=0)
    assert [p.visits for p in iid.phases] == [p.visits for p in inc.phases]
    assert iid.visits == inc.visits == 4 * len(labels)
    for batch in (1, 5, 16):
        assert [p.steps(batch) for p in iid.phases] == [p.steps(batch) for p in inc.phases]
    whole = torch.cat([p.order() for p in iid.phases])
    assert (torch.bincount(whole, minlength=len(labels)) == 4).all()
    assert set(labels[iid.phases[0].order()].tolist()) == set(range(6))


def test_batches_cut_the_visit_order_across_epoch_boundaries():
    phase = Phase(torch.arange(10, 20), start=7, stop=31, seed=5, classes=(0,))
    batches = list(phase.batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 4]
    assert torch.equal(torch.cat(batches), phase.order())
    assert len(phase.order()) == phase.visits == 24


# -- accuracy matrix and forgetting ------------------------------------------------------------
def hand_result() -> ContinualResult:
    # 4 classes, tasks [[2, 0], [1, 3]]; after phase 1 and phase 2
    return ContinualResult(model="m", protocol="incremental", tasks=[[2, 0], [1, 3]],
                           per_class=[[1.0, 0.0, 0.8, 0.0], [0.5, 1.0, 0.3, 0.9]],
                           visits=[10, 12])


def test_accuracy_matrix_final_accuracy_and_forgetting_by_hand():
    r = hand_result()
    a = r.matrix()
    assert a.flatten().tolist() == pytest.approx([0.9, 0.0, 0.4, 0.95])
    assert r.final_accuracy == pytest.approx((0.4 + 0.95) / 2)
    assert r.balanced_accuracy == pytest.approx((0.5 + 1.0 + 0.3 + 0.9) / 4)
    assert r.task_forgetting() == pytest.approx([0.5])
    assert r.forgetting == pytest.approx(0.5)
    rows = r.to_rows()
    assert len(rows) == 4 and rows[2] == {"model": "m", "protocol": "incremental",
                                          "after_phase": 2, "task": 1, "classes": "2 0",
                                          "accuracy": pytest.approx(0.4)}
    csv, md = summary_table([r])
    assert "m,incremental,0.675,0.500,0.400,22" in csv and "| m | incremental |" in md
    fig, axes = r.plot()
    assert len(axes) == 2


def test_forgetting_takes_the_best_earlier_accuracy_and_result_round_trips(tmp_path):
    r = ContinualResult(model="m", protocol="iid", tasks=[[0], [1], [2]],
                        per_class=[[0.2, 0.1, 0.0], [0.9, 0.5, 0.1], [0.6, 0.7, 0.3]],
                        visits=[3, 3, 3], meta={"lr": 0.1})
    assert r.task_forgetting() == pytest.approx([0.9 - 0.6, 0.5 - 0.7])
    assert r.forgetting == pytest.approx((0.3 - 0.2) / 2)
    back = ContinualResult.load(r.save(tmp_path / "r.json"))
    assert back == r and back.matrix().tolist() == r.matrix().tolist()
    missing = ContinualResult("m", "incremental", [[0, 1]], [[1.0, math.nan]], [1])
    assert missing.final_accuracy == 1.0
    assert math.isnan(ContinualResult.load(missing.save(tmp_path / "n.json")).per_class[0][1])


def test_per_class_accuracy_and_run_stream_score_every_phase():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert per_class_accuracy(torch.tensor([0, 1, 1, 1, 0, 0]), labels, 4)[:3] == [0.5, 1.0, 0.0]

    class Memorise:  # predicts the last class it was trained on
        last = 0

        def train_phase(self, phase):
            self.last = int(train_labels[phase.order()[-1]])
            return {"seen": self.last}

        def predict_test(self):
            return torch.full((6,), self.last)

    train_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    stream = incremental_stream(train_labels, [[0], [1], [2]], epochs=2, seed=0)
    result = run_stream(Memorise(), stream, labels, 3, model="memo")
    assert result.matrix().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert result.forgetting == 1.0 and result.visits == [4, 4, 4]
    assert result.meta == {"seen_phase1": 0, "seen_phase2": 1, "seen_phase3": 2}


# -- baselines ---------------------------------------------------------------------------------
def test_baselines_fit_and_follow_the_given_visit_order():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    settings = FitSettings(epochs=12, lr=5e-2, optimizer="adam", batch_size=16)
    for model in (LinearProbe(6, 2, seed=0), MLPProbe(6, 2, hidden=8, seed=0),
                  ridge("linear", 6, 2, 1e-2, seed=0)):
        log = model.fit(x, y, settings)
        assert log.visits == 12 * 64 and log.steps == 12 * 4
        assert (model.predict(x) == y).float().mean() > 0.9
    a, b = LinearProbe(6, 2, seed=0), LinearProbe(6, 2, seed=0)
    order = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    a.fit(x, y, FitSettings(batch_size=3), order=order)
    for batch in (order[:3], order[3:6], order[6:]):
        b.fit(x[batch], y[batch], FitSettings(batch_size=3), order=torch.arange(len(batch)))
    assert torch.equal(a.head.weight, b.head.weight)


def test_vq_bottleneck_uses_the_nearest_frozen_key():
    keys = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [-1.0, 2.0]]])
    vq = VQBottleneck(keys, 3, decoder="linear", seed=0)
    z = torch.tensor([[0.9, 0.8, -0.7, 1.9], [0.1, 0.0, 0.2, 0.1]])
    assert vq.indices(z).tolist() == [[1, 1], [0, 0]]
    assert vq.encode(z).tolist() == [[1.0, 1.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
    before = vq.keys.clone()
    vq.fit(z, torch.tensor([0, 2]), FitSettings(epochs=5, lr=0.5))
    assert torch.equal(vq.keys, before)  # only the decoder trains


# -- embeddings --------------------------------------------------------------------------------
def meta(**changes) -> EmbeddingMeta:
    base = {"data": "digits", "split": "train", "backbone": "resnet20_cifar@abcd1234",
            "architecture": "resnet20_cifar", "checkpoint": "best.pt",
            "checkpoint_sha256": "abcd1234" * 8,
            "preprocessing": {"mean": [0.1] * 3, "std": [0.2] * 3, "image_size": 32,
                              "resize": None},
            "dim": 3, "count": 4, "class_names": ("a", "b")}
    return EmbeddingMeta(**{**base, **changes})


def test_embedding_files_round_trip_and_refuse_other_metadata(tmp_path):
    emb = Embeddings(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), meta())
    path = emb.save(embedding_path(tmp_path, "resnet20_cifar@abcd1234", "digits", "train"))
    assert path.name == "resnet20_cifar@abcd1234_digits_train.pt"
    back = load_embeddings(path, data="digits", split="train", backbone="resnet20_cifar@abcd1234",
                           dim=3)
    assert torch.equal(back.features, emb.features) and torch.equal(back.labels, emb.labels)
    assert back.meta == emb.meta and read_meta(path) == emb.meta
    for wrong, text in (({"split": "test"}, "split 'train', not 'test'"),
                        ({"data": "cifar10:x"}, "data 'digits', not 'cifar10:x'"),
                        ({"backbone": "other@1"}, "backbone"), ({"dim": 5}, "dim 3, not 5")):
        with pytest.raises(UserError, match=text) as info:
            load_embeddings(path, **wrong)
        assert "\n" not in str(info.value)
    (tmp_path / "foreign.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable embedding file"):
        load_embeddings(tmp_path / "foreign.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a narrows embedding file"):
        load_embeddings(tmp_path / "other.pt")
    with pytest.raises(UserError, match="no embedding file"):
        load_embeddings(tmp_path / "missing.pt")


def test_file_names_keep_data_sets_splits_and_backbones_apart():
    names = {file_name(b, d, s) for b in ("r20@1", "r20@2") for s in ("train", "test")
             for d in ("digits", "cifar10:a", "cifar10:b", "cifar100:a")}
    assert len(names) == 16
    assert data_key("digits") == "digits" and data_key("cifar10:a").startswith("cifar10-")


def test_compute_embeddings_resumes_from_its_partial_file(tmp_path, random_checkpoint):
    from narrows.data import load
    from narrows.models import load_model

    model = load_model(random_checkpoint(TINY)).model
    bundle = load(TINY)
    data = bundle.split("test", "none")
    info = bundle.info
    m = meta(data=TINY, dim=0, count=0)
    kwargs = {"mean": info.mean, "std": info.std}
    full = compute_embeddings(model, data, m, how=Streaming(batch_size=4), **kwargs)
    assert full.features.shape == (16, 64) and full.meta.dim == 64 and full.meta.count == 16
    assert torch.equal(full.labels, data.labels)
    partial = tmp_path / "p.partial"
    how = Streaming(batch_size=4, resume=partial, save_every=1)
    calls = {"n": 0}

    def counted(module, inputs):
        calls["n"] += 1
        if calls["n"] == killed_at:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(counted)
    killed_at = 3  # two batches (8 images) saved, killed in the third
    with pytest.raises(KeyboardInterrupt):
        compute_embeddings(model, data, m, how=how, **kwargs)
    calls["n"], killed_at = 0, -1
    resumed = compute_embeddings(model, data, m, how=how, **kwargs)
    handle.remove()
    assert calls["n"] == 2  # only the 8 images the partial file lacked
    assert torch.allclose(resumed.features, full.features, atol=1e-5)
    assert torch.equal(resumed.labels, full.labels) and not partial.exists()


# -- command line ------------------------------------------------------------------------------
SMALL = ["--epochs", "2", "--batch-size", "8", "--num-books", "4", "--num-pairs", "16",
         "--dim-key", "4", "--init-epochs", "1", "--data", TINY]


def test_cli_embed_then_train_writes_tables_and_resumes(random_checkpoint, tmp_path, capsys):
    checkpoint = random_checkpoint(TINY)
    emb = tmp_path / "emb"
    assert main(["kvb", "embed", "--backbone", checkpoint, "--out", str(emb), *QUIET]) == 0
    files = sorted(p.name for p in emb.iterdir())
    assert len(files) == 2 and all(data_key(TINY) in f for f in files)
    assert main(["kvb", "embed", "--backbone", checkpoint, "--out", str(emb), *QUIET]) == 0
    assert "already embedded" in capsys.readouterr().out
    run = tmp_path / "run"
    argv = ["kvb", "train", "--embeddings", str(emb), *SMALL, "--model", "dkvb", "linear", "vq",
            "--out", str(run), *QUIET]
    assert main(argv) == 0
    for name in ("table.md", "table.csv", "accuracy_matrix.csv", "results.json", "keys.pt",
                 "comparison.png", "accuracy_matrices.png", "results/dkvb-iid.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "results.json").read_text())  # flat: "<model>/<protocol>.<score>"
    assert isinstance(summary, dict) and all(not isinstance(v, (dict, list))
                                             for v in summary.values())
    assert summary.pop("summary").count("final") == 6  # one line, every model and protocol
    assert {tuple(k.split(".")[0].split("/")) for k in summary} == {
        (m, p) for m in ("dkvb", "linear", "vq") for p in ("incremental", "iid")}
    assert len({v for k, v in summary.items() if k.endswith(".visits")}) == 1
    capsys.readouterr()
    assert main([*argv[:-len(QUIET) - 2], "--model", "dkvb", "mlp", "--out", str(run),
                 *QUIET]) == 0
    out = capsys.readouterr().out
    assert "keys fitted before" in out and "dkvb, incremental: done before" in out
    assert (run / "results" / "mlp-incremental.json").is_file()


def test_cli_fits_keys_on_another_data_set(random_checkpoint, tmp_path, capsys):
    checkpoint = random_checkpoint(TINY)
    emb = tmp_path / "emb"
    other = "shapes:classes=3,size=16,train=24,test=8,seed=7"
    assert main(["kvb", "embed", "--backbone", checkpoint, "--out", str(emb), *QUIET]) == 0
    assert main(["kvb", "embed", "--backbone", checkpoint, "--data", other, "--split", "train",
                 "--out", str(emb), *QUIET]) == 0
    assert len(list(emb.iterdir())) == 3
    capsys.readouterr()
    assert main(["kvb", "train", "--embeddings", str(emb), *SMALL, "--key-data", other,
                 "--model", "dkvb", "--protocol", "incremental", "--out", str(tmp_path / "run"),
                 *QUIET]) == 0
    assert f"on 24 unlabelled embeddings ({other} train)" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_2(random_checkpoint, tmp_path, capsys):
    checkpoint = random_checkpoint(TINY)
    emb = tmp_path / "emb"
    assert main(["kvb", "embed", "--backbone", checkpoint, "--out", str(emb), *QUIET]) == 0
    train_file = next(emb.glob("*_train.pt"))
    test_file = next(emb.glob("*_test.pt"))
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / train_file.name).write_bytes(test_file.read_bytes())  # a misnamed file
    (swapped / test_file.name).write_bytes(test_file.read_bytes())
    cases = [
        (["embed", "--out", str(tmp_path / "e1")], "no backbone given"),
        (["embed", "--model", "resnet_nonexistent", "--out", str(tmp_path / "e2"),
          "--data", "digits"], "unknown model"),
        (["embed", "--backbone", str(tmp_path / "none.pt"), "--out", str(tmp_path / "e3")],
         "does not exist"),
        (["train", "--embeddings", str(tmp_path / "nowhere"), *SMALL], "no embedding directory"),
        (["train", "--embeddings", str(emb), *SMALL[:-1], "digits"], "no training embeddings"),
        (["train", "--embeddings", str(emb), *SMALL, "--classes-per-task", "3"], "cannot be cut"),
        (["train", "--embeddings", str(emb), *SMALL, "--key-split", "test"], "test images"),
        (["train", "--embeddings", str(swapped), *SMALL], "split 'test', not 'train'"),
    ]
    for i, (args, message) in enumerate(cases):
        argv = ["kvb", *args, *QUIET]
        if "--out" not in args:
            argv += ["--out", str(tmp_path / f"run{i}")]
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_library_api_matches_the_cli_defaults_and_runs_without_a_run_directory(
        random_checkpoint, tmp_path):
    import dataclasses

    from narrows.cli.kvb import TrainConfig
    from narrows.cli.kvb_toy import ToyConfig
    from narrows.kvb import LEARNERS, ContinualSettings, embed, train_continual
    from narrows.kvb.toy_run import ToySettings

    for api, cli in ((ContinualSettings, TrainConfig), (ToySettings, ToyConfig)):
        for f in dataclasses.fields(api):
            assert getattr(api(), f.name) == getattr(cli(), f.name), f.name
    assert set(LEARNERS) == {"dkvb", "linear", "lp-no-bias", "mlp", "ridge", "ridge-mlp", "vq"}
    files = embed(random_checkpoint(TINY), out=tmp_path / "emb", say=lambda _: None)
    assert sorted(files) == ["test", "train"] and all(p.is_file() for p in files.values())
    result = train_continual(tmp_path / "emb", model=["dkvb", "linear"], protocol=["iid"],
                             epochs=2, batch_size=8, num_books=4, say=lambda _: None)
    assert [r.model for r in result.results] == ["dkvb", "linear"] and result.path is None
    assert result.settings.classes_per_task == 2 and "dkvb" in result.summary()
    with pytest.raises(UserError, match="`dim_key` 99"):
        train_continual(tmp_path / "emb", dim_key=99, say=lambda _: None)
    with pytest.raises(UserError, match="unknown option `epoch`"):
        train_continual(tmp_path / "emb", epoch=2)
