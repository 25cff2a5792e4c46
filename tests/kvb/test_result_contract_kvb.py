"""The result contract (narrows.runs.results) for kvb's result classes and the sweep's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import check_result_contract, same_rows  # noqa: E402

from narrows.kvb.continual import ContinualRun, ContinualSettings  # noqa: E402
from narrows.kvb.results import ContinualResult  # noqa: E402
from narrows.kvb.toy import NUM_CLASSES, Evaluation, SeedResult, summarise  # noqa: E402
from narrows.kvb.toy_run import ToyRun, ToySettings  # noqa: E402
from narrows.runs.sweep import SweepResult, flatten_results  # noqa: E402


def _continual(model: str = "dkvb", protocol: str = "incremental") -> ContinualResult:
    return ContinualResult(model, protocol, [[0, 1], [2, 3]],
                           [[0.9, 0.8, 0.0, math.nan], [0.5, 0.4, 0.9, 0.7]], [10, 10],
                           {"class_names": ["a", "b", "c", "d"], "seconds": 0.5})


def _seed(seed: int = 0) -> SeedResult:
    per_class = [[(i + c) % 3 / 2 for c in range(NUM_CLASSES)] for i in range(5)]
    evaluations = [Evaluation("mlp", "MLP", None, per_class, [None] * 5),
                   Evaluation("kv-1x400", "KV 1x400", True, per_class, [0.1, 0.2, 0.3, 0.4, 0.5])]
    maps = {"mlp": torch.zeros(5, 6, 6, dtype=torch.uint8),
            "kv-1x400": torch.ones(5, 6, 6, dtype=torch.uint8)}
    return SeedResult(seed, evaluations, maps, 0.25)


def _toy() -> ToyRun:
    results = [_seed(0), _seed(1)]
    settings = ToySettings(seeds=[0, 1], models=["mlp", "kv-1x400"], steps=5, train_points=8,
                           test_points=16, resolution=6)
    return ToyRun(settings, results, summarise(results))


def _continual_run() -> ContinualRun:
    return ContinualRun([_continual(), _continual("linear", "iid")], ContinualSettings(seed=3),
                        [[0, 1], [2, 3]], ["a", "b", "c", "d"], "resnet@abc")


def _sweep(path: Path) -> SweepResult:
    return SweepResult(path, [{"run": "seeds=0", "seeds": "0", "status": "done", "final_mlp": 0.5},
                              {"run": "seeds=1", "seeds": "1", "status": "failed: x"}], ["x"])


# (build, file name to save to, the file holding the header, kind)
CASES = {
    "ContinualResult": (lambda tmp: _continual(), "r.json", "r.json", "kvb.continual"),
    "ContinualRun": (lambda tmp: _continual_run(), "run", "run/continual.json", "kvb.run"),
    "SeedResult": (lambda tmp: _seed(4), "seed4.json", "seed4.json", "kvb.toy-seed"),
    "ToyRun": (lambda tmp: _toy(), "toy", "toy/toy.json", "kvb.toy"),
    "SweepResult": (lambda tmp: _sweep(tmp), "sweep.json", "sweep.json", "sweep"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_contract(name, tmp_path):
    build, file, header_file, kind = CASES[name]
    check_result_contract(build(tmp_path), tmp_path, file, header_file, kind)


def test_old_files_without_header_still_load(tmp_path):
    r = _continual()
    (tmp_path / "old.json").write_text(json.dumps(r.to_dict()))
    assert same_rows(ContinualResult.load(tmp_path / "old.json").to_rows(), r.to_rows())


def test_continual_run_reads_list_and_flat_results_json(tmp_path):
    from narrows.kvb.continual import result_names

    run = _continual_run()
    listed = run.scores()
    flat = run.flat()
    assert result_names(listed) == result_names(flat) == [("dkvb", "incremental"),
                                                          ("linear", "iid")]
    assert flat["summary"] == run.summary()
    numbers = {k: v for k, v in flat.items() if k != "summary"}
    assert flatten_results(listed, None) == flatten_results(flat, None) == numbers
    run.save(tmp_path)
    (tmp_path / "continual.json").unlink()  # an older run directory
    assert same_rows(ContinualRun.load(tmp_path).to_rows(), run.to_rows())


def test_toy_results_json_is_flat(tmp_path):
    _toy().save(tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["seeds"] == [0, 1] and 0 <= doc["final_mlp"] <= 1
    assert all(not isinstance(v, dict) for v in doc.values())
