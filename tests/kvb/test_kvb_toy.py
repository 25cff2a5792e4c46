"""The 2-D toy of Figure 2 (data, lockstep training, KV keeps / MLP forgets), ``narrows kvb toy``
and ``narrows kvb sweep`` (grid, resume, results table, the wandb error)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from narrows.cli import main
from narrows.kvb import toy


@pytest.fixture(scope="module")
def small_run() -> list[toy.SeedResult]:
    """Seed 0 with the authors' key fitting and 300 steps per stage (fewer than 1000)."""
    return toy.run_seeds([0], ["linear", "mlp", "kv-1x400", "kv-20x20"], steps=300,
                         resolution=20)


def _evaluation(result: toy.SeedResult, key: str) -> toy.Evaluation:
    return next(e for e in result.evaluations if e.key == key)


# -- data -------------------------------------------------------------------------------------
def test_data_is_seeded_and_has_the_geometry_of_the_spec():
    a, b, c = toy.make_data(0), toy.make_data(0), toy.make_data(1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2)
               for (x1, y1), (x2, y2) in zip(a.train + a.test, b.train + b.test, strict=True))
    assert not torch.equal(a.train[0][0], c.train[0][0])
    assert toy.STAGES == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert toy.CENTRES[0] == (0.25, 0.25) and toy.CENTRES[4] == (0.75, 0.5)
    assert toy.CENTRES[7] == (0.5, 0.25) and toy.SIGMA == 0.035
    for stage, ((x, y), (xt, yt)) in enumerate(zip(a.train, a.test, strict=True)):
        assert x.shape == (100, 2) and x.dtype == torch.float32 and xt.shape == (1000, 2)
        assert set(y.tolist()) == set(toy.STAGES[stage]) == set(yt.tolist())
        assert 30 <= int((y == toy.STAGES[stage][0]).sum()) <= 70  # a fair coin, not 50/50
        for cls in toy.STAGES[stage]:
            pts = xt[yt == cls]
            centre = torch.tensor(toy.CENTRES[cls])
            assert torch.allclose(pts.mean(0), centre, atol=0.006)
            assert torch.allclose(pts.std(0), torch.full((2,), 0.035), rtol=0.15)
    keys = toy.key_batches(0, batches=3, batch_size=100)
    assert len(keys) == 3 and keys[0].shape == (100, 2)
    assert float(torch.stack(keys).min()) >= 0 and float(torch.stack(keys).max()) <= 1
    grid = toy.grid_points(5)
    assert grid.shape == (25, 2) and grid[1].tolist() == [0.25, 0.0]


# -- the experiment ---------------------------------------------------------------------------
def test_kv_keeps_every_class_while_mlp_and_linear_probe_forget(small_run):
    (result,) = small_run
    stage1 = toy.STAGES[0]
    for key in ("kv-1x400", "kv-20x20"):  # pruned evaluation, the default
        kv = _evaluation(result, key)
        assert min(kv.per_class[-1]) >= 0.95, (key, kv.per_class[-1])
        assert kv.task_accuracy(1, 0) >= 0.95
    for key in ("mlp", "linear"):
        net = _evaluation(result, key)
        assert net.task_accuracy(1, 0) >= 0.95  # learnt stage 1 ...
        assert all(net.per_class[-1][c] <= 0.3 for c in stage1)  # ... and forgot it
        assert net.final() <= 0.3
    kv = _evaluation(result, "kv-1x400")
    assert 0 < kv.used[-1] < 0.5 and kv.used[0] == 0  # a few cells of 400 are used
    assert result.maps["kv-1x400"].shape == (5, 20, 20)
    assert result.maps["kv-1x400"].dtype == torch.uint8


def test_lockstep_training_gives_each_seed_its_own_result():
    torch.set_num_threads(2)  # an earlier command of the session may have set another count
    torch.manual_seed(0)
    kwargs = {"steps": 40, "key_batches_count": 300, "resolution": 8, "test_points": 200}
    together = toy.run_seeds([0, 1], ["mlp", "kv-20x20"], **kwargs)
    alone = toy.run_seeds([1], ["mlp", "kv-20x20"], **kwargs)[0]
    for a, b in zip(together[1].evaluations, alone.evaluations, strict=True):
        assert a.key == b.key and a.per_class == b.per_class
    assert torch.equal(together[1].maps["mlp"], alone.maps["mlp"])
    assert torch.get_num_threads() == 2  # restored after the single-threaded run


def test_sgd_values_of_pairs_not_fetched_in_a_stage_are_bit_identical():
    data = toy.make_data(0)
    (learner,) = toy.make_learners("kv-20x20", [0], key_batches_count=300)
    learner.spec = toy.ToyModel(**{**learner.spec.__dict__, "optimizer": "sgd", "lr": 0.5})
    trainer = toy.LockstepTrainer([learner])
    trainer.train_stage([data.train[0][0]], [data.train[0][1]], 20)
    before = learner.layer.values.detach().clone()
    fetched = learner.layer.indices(data.train[1][0])[:, 0, :, 0]  # (B, C)
    trainer.train_stage([data.train[1][0]], [data.train[1][1]], 20)
    after = learner.layer.values.detach()
    touched = torch.zeros(before.shape[:2], dtype=torch.bool)
    touched[torch.arange(before.shape[0]).expand_as(fetched), fetched] = True
    assert torch.equal(before[~touched], after[~touched])
    assert not torch.equal(before[touched], after[touched])


def test_summary_and_tables(small_run):
    summary = toy.summarise(small_run)
    assert set(summary) == {"linear", "mlp", "kv-1x400", "kv-1x400/no-prune", "kv-20x20",
                            "kv-20x20/no-prune"}
    assert summary["mlp"]["matrix"][0][0] == pytest.approx(1.0, abs=0.05)
    table = toy.summary_table(summary)
    assert "KV 1×400 (Adam 1e-3), pruning" in table and "no pruning" in table
    assert len(toy.csv_rows(small_run)) == 6 * 5  # evaluations × (init + 4 stages)


# -- the commands -----------------------------------------------------------------------------
def test_toy_command_writes_outputs_and_resumes(tmp_path, capsys):
    from narrows.cli.kvb_toy import TOY_MODELS

    assert TOY_MODELS == tuple(toy.MODELS)
    out = tmp_path / "toy"
    args = ["kvb", "toy", "--out", str(out), "--seeds", "3", "--models", "mlp", "--steps", "30",
            "--resolution", "10", "--test-points", "100", "--no-progress"]
    assert main(args) == 0
    for name in ("toy.csv", "toy.md", "toy.png", "results.json", "seeds/seed3.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [3] and 0 <= results["final_mlp"] <= 1
    rows = list(csv.DictReader((out / "toy.csv").open()))
    assert len(rows) == 5 and rows[-1]["after_stage"] == "4"
    capsys.readouterr()
    assert main(args) == 0
    assert "finished before, loaded" in capsys.readouterr().out
    assert main([*args[:-3], "--steps", "31"]) == 2  # other options: refused


def _sweep_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text("command: kvb toy\n"
                    "options: {seeds: [0], models: [mlp], resolution: 8, test_points: 50}\n"
                    "grid:\n  steps: [5, 10]\n  train_points: [20]\n" + extra)
    return path


def test_sweep_grid_names_and_errors(tmp_path):
    from narrows.errors import UserError
    from narrows.runs.sweep import expand_grid, read_sweep, run_name

    grid = {"a": [1, 2], "b": ["x", "y", "z"]}
    combos = expand_grid(grid)
    assert len(combos) == 6 and combos[0] == {"a": 1, "b": "x"} and combos[1] == {"a": 1, "b": "y"}
    assert expand_grid({}) == [{}]
    assert run_name({"steps": 5, "models": ["mlp", "kv-1x400"]}) == "steps=5-models=mlp+kv-1x400"
    long = run_name({"x" * 50: 1, "y" * 50: 2})
    assert len(long) <= 80 and long != run_name({"x" * 50: 1, "y" * 50: 3})
    sweep = read_sweep(_sweep_file(tmp_path))
    assert sweep.command == ("kvb", "toy") and sweep.name == "sweep"
    assert sweep.grid == {"steps": [5, 10], "train_points": [20]}
    bad = tmp_path / "bad.yaml"
    for text, message in (("options: {}\n", "no 'command'"),
                          ("command: kvb toy\ngrid: {steps: 5}\n", "non-empty list"),
                          ("command: kvb toy\nopts: {}\n", "unknown key 'opts'"),
                          ("command: kvb toy\noptions: {out: x}\n", "sets 'out'")):
        bad.write_text(text)
        with pytest.raises(UserError, match=message):
            read_sweep(bad)
    bad.write_text("command: kvb nothing\n")
    assert main(["kvb", "sweep", str(bad), "--out", str(tmp_path / "x")]) == 2
    bad.write_text("command: kvb toy\ngrid: {stepz: [1]}\n")
    assert main(["kvb", "sweep", str(bad), "--out", str(tmp_path / "x")]) == 2


def test_results_are_flattened_into_one_row():
    from narrows.runs.sweep import flatten_results

    toy_like = {"final_mlp": 0.25, "seeds": [0], "summary": {"n": 3, "x": {"deep": 1}}}
    assert flatten_results(toy_like, None) == {"final_mlp": 0.25, "summary.n": 3}
    train_like = [{"model": "dkvb", "protocol": "incremental", "final_accuracy": 0.9,
                   "optimizer": "sgd", "flag": True},
                  {"model": "mlp", "protocol": "iid", "final_accuracy": 0.8}]
    assert flatten_results(train_like, None) == {"dkvb/incremental.final_accuracy": 0.9,
                                                 "mlp/iid.final_accuracy": 0.8}
    picked = flatten_results(train_like, ["mlp/iid.final_accuracy", "missing"])
    assert picked == {"mlp/iid.final_accuracy": 0.8, "missing": None}
    assert flatten_results(toy_like, ["summary.x.deep"]) == {"summary.x.deep": 1}


def test_sweep_runs_the_grid_and_skips_finished_runs(tmp_path, capsys, monkeypatch):
    import narrows.cli.kvb_toy as cli

    path, out = _sweep_file(tmp_path), tmp_path / "sweep-out"
    assert main(["kvb", "sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in rows] == ["steps=5-train_points=20", "steps=10-train_points=20"]
    assert all(r["status"] == "done" and float(r["final_mlp"]) >= 0 for r in rows)
    assert "| run | steps | train_points | status |" in (out / "results.md").read_text()

    path.write_text(path.read_text().replace("[5, 10]", "[5, 10, 15]"))  # grow the grid
    calls = []
    original = cli.execute_toy
    monkeypatch.setattr(cli, "execute_toy", lambda cfg: calls.append(cfg.steps) or original(cfg))
    capsys.readouterr()
    assert main(["kvb", "sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    assert calls == [15]  # only the new run
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done before", "done before", "done"]
    assert "finished before, skipped" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())  # the sweep's own flat summary
    assert summary["command"] == "kvb sweep" and summary["summary"].endswith("0 failed")
    assert (summary["runs"], summary["done"], summary["done_before"]) == (3, 1, 2)


def test_sweep_wandb_without_the_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    path = _sweep_file(tmp_path)
    assert main(["kvb", "sweep", str(path), "--out", str(tmp_path / "w"), "--wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--wandb needs the package 'wandb'" in err and "pip install wandb" in err
    assert not (tmp_path / "w").exists()  # nothing ran


def test_sweep_logs_each_new_run_to_wandb_when_asked(tmp_path, monkeypatch):
    import types

    calls: list[tuple] = []

    class FakeRun:
        def log(self, row):
            calls.append(("log", row))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    path = _sweep_file(tmp_path, "wandb_project: toy-project\n")
    assert main(["kvb", "sweep", str(path), "--out", str(tmp_path / "w"), "--wandb",
                 "--no-progress"]) == 0
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["name"] for i in inits] == ["steps=5-train_points=20", "steps=10-train_points=20"]
    assert inits[0]["project"] == "toy-project" and inits[0]["group"] == "sweep"
    assert inits[0]["config"]["steps"] == 5 and inits[0]["config"]["command"] == "kvb toy"
    logged = [c[1] for c in calls if c[0] == "log"]
    assert "final_mlp" in logged[0] and len([c for c in calls if c[0] == "finish"]) == 2
    calls.clear()
    assert main(["kvb", "sweep", str(path), "--out", str(tmp_path / "w"), "--wandb"]) == 0
    assert calls == []  # finished runs are not logged again


def test_top_level_sweep_runs_a_grid_of_any_command(tmp_path, capsys):
    path, out = _sweep_file(tmp_path), tmp_path / "top"
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    assert "2 run(s) of narrows kvb toy" in capsys.readouterr().out and not out.exists()
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert "command: sweep" in (out / "config.yaml").read_text()
    assert main(["kvb", "sweep", str(path), "--out", str(out)]) == 2  # another command's run
    path.write_text("command: sweep\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "a sweep cannot run sweeps" in capsys.readouterr().err
