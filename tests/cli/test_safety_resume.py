"""Kill-and-resume through the command line (issue 11, item 4): a command stopped part-way and
run again ends with results bit-identical to an uninterrupted run, and does not redo the work
it had saved. The core loops have their own resume tests (test_decompose_core.py,
test_kvb_protocols.py, test_training.py, test_interactions_runner.py, test_safety_iba_seed.py,
test_attribution_readout_cli.py); these cover the commands around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from narrows.cli import main

DATA = "shapes:classes=2,size=16,train=16,test=8"


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> str:
    return random_checkpoint(DATA)


class Dying:
    """Counts calls of ``function`` and raises KeyboardInterrupt at call ``die_at``."""

    def __init__(self, function, die_at: int | None = None):
        self.function, self.die_at, self.calls = function, die_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        return self.function(*args, **kwargs)


def _patched(monkeypatch, module, name: str):
    """A ``patch(die_at)`` for :func:`_killed_then_resumed` that wraps ``module.name``."""
    function = getattr(module, name)
    current: dict[str, Dying] = {}

    def patch(die_at):
        current["d"] = Dying(function, die_at)
        monkeypatch.setattr(module, name, lambda *a, **k: current["d"](*a, **k))
        return current["d"]

    return patch


def _killed_then_resumed(argv_for, patch, die_at: int, tmp_path: Path, capsys):
    """Run uninterrupted into ``tmp_path/a``; run into ``b`` killed at call ``die_at``, then
    again. Returns (a, b, calls uninterrupted, calls of the resumed run)."""
    a, b = tmp_path / "a", tmp_path / "b"
    whole = patch(None)
    assert main(argv_for(a)) == 0
    patch(die_at)
    assert main(argv_for(b)) == 130  # interrupted: 'rerun the same command to resume'
    assert "resume" in capsys.readouterr().err
    resumed = patch(None)
    assert main(argv_for(b)) == 0
    return a, b, whole.calls, resumed.calls


def test_decompose_extract_resumes_bit_identically(checkpoint, tmp_path, monkeypatch, capsys):
    from narrows.decompose.histogram import TopKHistogram

    patch = _patched(monkeypatch, TopKHistogram, "update")

    def argv(out: Path) -> list[str]:
        return ["decompose", "extract", "--checkpoint", checkpoint, "--data", DATA,
                "--batch-size", "4", "--save-every", "1", "--no-progress", "--threads", "1",
                "--out", str(out)]

    a, b, whole, resumed = _killed_then_resumed(argv, patch, 3, tmp_path, capsys)
    assert resumed == whole - 2  # the two saved batches are not counted again
    assert not (b / "partial.pt").exists()
    first = torch.load(a / "histogram.pt", weights_only=True)
    second = torch.load(b / "histogram.pt", weights_only=True)
    _assert_same(first, second)
    for name in ("results.json", "indices.json", "ranking.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def test_kvb_embed_resumes_bit_identically(checkpoint, tmp_path, monkeypatch, capsys):
    import narrows.kvb.embeddings as embeddings

    pooled = embeddings.pooled_features
    current: dict[str, Dying] = {}

    def patch(die_at):
        dying = current["d"] = Dying(lambda f, x: f(x), die_at)
        monkeypatch.setattr(embeddings, "pooled_features",
                            lambda model: (lambda x, f=pooled(model): dying(f, x)))
        return dying

    def argv(out: Path) -> list[str]:
        return ["kvb", "embed", "--checkpoint", checkpoint, "--data", DATA, "--batch-size", "4",
                "--save-every", "1", "--no-progress", "--threads", "1", "--out", str(out)]

    a, b, whole, resumed = _killed_then_resumed(argv, patch, 3, tmp_path, capsys)
    assert resumed == whole - 2  # two saved batches of the train split are kept
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".pt")
    assert names == sorted(p.name for p in b.iterdir() if p.suffix == ".pt") and len(names) == 2
    assert not [p for p in b.iterdir() if p.name.endswith(".partial")]
    for name in names:
        _assert_same(torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True))


def _assert_same(first, second) -> None:
    """Equal structures; tensors bit for bit."""
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor) and first.dtype == second.dtype
        torch.testing.assert_close(first, second, rtol=0, atol=0, equal_nan=True)  # NaN == NaN
    elif isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            _assert_same(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for x, y in zip(first, second, strict=True):
            _assert_same(x, y)
    else:
        assert first == second


# -- attribution ------------------------------------------------------------------------------

def _mtimes(directory: Path, pattern: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.glob(pattern))}


def test_attribution_evaluate_resumes_bit_identically(checkpoint, tmp_path, monkeypatch, capsys):
    import numpy as np

    import narrows.attribution.evaluation as cli

    patch = _patched(monkeypatch, cli, "_attribute")

    def argv(out: Path) -> list[str]:
        return ["attribution", "evaluate", "--checkpoint", checkpoint, "--data", DATA,
                "--methods", "random,saliency", "--metrics", "degradation,bbox", "--images", "3",
                "--tile", "4", "--points", "3", "--no-progress", "--threads", "1",
                "--device", "cpu", "--out", str(out)]

    import narrows.attribution as attribution

    degradation, scored = attribution.degradation, []
    monkeypatch.setattr(attribution, "degradation",
                        lambda net, *a, **k: scored.append(1) or degradation(net, *a, **k))
    a, b, whole, resumed = _killed_then_resumed(argv, patch, 4, tmp_path, capsys)
    assert whole == 6 and resumed == 3  # random's 3 heatmaps were cached: saliency only
    assert len(scored) == 2 + 1 + 1  # its metrics too: the resumed run scored saliency only
    for method in ("random", "saliency"):
        with np.load(a / f"heatmaps_{method}.npz") as x, np.load(b / f"heatmaps_{method}.npz") as y:
            assert np.array_equal(x["heatmaps"], y["heatmaps"])
            assert np.array_equal(x["indices"], y["indices"])
    names = sorted(p.name for p in a.glob("metric_*.json"))
    assert len(names) == 4 and names == sorted(p.name for p in b.glob("metric_*.json"))
    for name in [*names, "results.csv", "results.md"]:
        assert (a / name).read_text() == (b / name).read_text(), name


def _stamping(patch, directory: Path, pattern: str, current: dict):
    """``patch`` that, when called for the resumed run, first records the mtimes of
    ``directory/pattern`` (the files the killed run had finished) in ``current['stamps']``."""
    calls = {"n": 0}

    def wrapped(die_at):
        calls["n"] += 1
        if calls["n"] == 3:
            current["stamps"] = _mtimes(directory, pattern)
            assert current["stamps"]
        return patch(die_at)

    return wrapped


def test_attribution_sanity_resumes_bit_identically(checkpoint, tmp_path, monkeypatch, capsys):
    import narrows.attribution.metrics as metrics

    patch = _patched(monkeypatch, metrics, "cascading_randomisation")
    stamps: dict = {}

    def argv(out: Path) -> list[str]:
        return ["attribution", "sanity", "--checkpoint", checkpoint, "--data", DATA,
                "--methods", "random,saliency", "--images", "2", "--repeats", "1",
                "--randomise", "linear", "--no-progress", "--threads", "1", "--device", "cpu",
                "--out", str(out)]

    a, b, whole, resumed = _killed_then_resumed(
        argv, _stamping(patch, tmp_path / "b", "sanity_random.pt", stamps), 2, tmp_path, capsys)
    assert whole == 2 and resumed == 1  # random's result was saved: saliency only
    assert _mtimes(b, "sanity_random.pt") == stamps["stamps"]
    for method in ("random", "saliency"):
        _assert_same(torch.load(a / f"sanity_{method}.pt", weights_only=True),
                     torch.load(b / f"sanity_{method}.pt", weights_only=True))
    for name in ("sanity.csv", "sanity.md"):
        assert (a / name).read_text() == (b / name).read_text(), name


# -- decompose essential / mutual-info -------------------------------------------------------

@pytest.fixture(scope="module")
def csg_and_indices(checkpoint, tmp_path_factory) -> tuple[str, str]:
    """A CSG checkpoint (the random model with a seeded random gate) and top-|W| indices."""
    from narrows.decompose.csg import CSGNetwork, save_csg
    from narrows.decompose.indices import ClassIndices
    from narrows.models import load_model

    root = tmp_path_factory.mktemp("csg")
    loaded = load_model(checkpoint)
    network = CSGNetwork(loaded.model)
    with torch.no_grad():
        network.gate.copy_(torch.rand(network.gate.shape, generator=torch.Generator().manual_seed(0)))
    save_csg(root / "csg.pt", network, loaded.card)
    ClassIndices.top_weights(loaded.model.linear, 5).save(root / "ind5.json")
    return str(root / "csg.pt"), str(root / "ind5.json")


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    """Byte-identical files; JSON files compared without their wall-clock ``seconds``."""
    for name in names:
        if name.endswith(".json"):
            first, second = (_untimed(json.loads((d / name).read_text())) for d in (a, b))
            assert first == second, name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _untimed(value):
    """``value`` without the keys named ``seconds`` or ending ``.seconds`` (flat summaries):
    timings differ from run to run."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items()
                if k != "seconds" and not k.endswith(".seconds")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def test_decompose_essential_resumes_bit_identically(checkpoint, csg_and_indices, tmp_path,
                                                     monkeypatch, capsys):
    import narrows.decompose.essential as essential

    csg, indices = csg_and_indices

    def argv(out: Path) -> list[str]:
        return ["decompose", "essential", "--checkpoint", checkpoint, "--indices", indices,
                "--csg-checkpoint", csg, "--csg-order", "both", "--sigma", "0", "1",
                "--no-progress", "--threads", "1", "--device", "cpu", "--out", str(out)]

    a, b, whole, resumed = _killed_then_resumed(
        argv, _patched(monkeypatch, essential, "essential_features"), 2, tmp_path, capsys)
    assert whole == 3 and resumed == 2  # 'ours' was saved before the kill
    names = sorted(p.name for p in a.glob("essential_*.json"))
    assert len(names) == 3 and names == sorted(p.name for p in b.glob("essential_*.json"))
    _same_files(a, b, [*names, "results_essential_features.json", "essential.csv",
                       "essential.md"])


def test_decompose_mutual_info_resumes_bit_identically(checkpoint, csg_and_indices, tmp_path,
                                                       monkeypatch, capsys):
    import narrows.decompose.mutual_info as mutual_info

    csg, indices = csg_and_indices

    def argv(out: Path) -> list[str]:
        return ["decompose", "mutual-info", "--checkpoint", checkpoint, "--indices", indices,
                "--csg-checkpoint", csg, "--mis", "--random-draws", "2", "--no-progress",
                "--threads", "1", "--device", "cpu", "--out", str(out)]

    a, b, whole, resumed = _killed_then_resumed(
        argv, _patched(monkeypatch, mutual_info, "mis"), 2, tmp_path, capsys)
    assert whole == 2 and resumed == 1  # the MIS of 'ours' was saved before the kill
    _same_files(a, b, ["mis_ours.json", "mis_csg.json", "mutual_info.json", "mutual_info.csv",
                       "mutual_info.md"])


# -- kvb train / toy / sweep -----------------------------------------------------------------

@pytest.fixture(scope="module")
def embeddings(checkpoint, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("embeddings")
    assert main(["kvb", "embed", "--checkpoint", checkpoint, "--data", DATA, "--no-progress",
                 "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    return str(out)


def test_kvb_train_resumes_bit_identically(embeddings, tmp_path, monkeypatch, capsys):
    import narrows.kvb.continual as cli

    def argv(out: Path) -> list[str]:
        return ["kvb", "train", "--embeddings", embeddings, "--model", "dkvb", "linear",
                "--epochs", "2", "--batch-size", "8", "--num-books", "4", "--num-pairs", "16",
                "--dim-key", "4", "--init-epochs", "1", "--no-progress", "--threads", "1",
                "--device", "cpu", "--out", str(out)]

    a, b, whole, resumed = _killed_then_resumed(argv, _patched(monkeypatch, cli, "_run_one"), 2,
                                                tmp_path, capsys)
    assert whole == 4 and resumed == 3  # dkvb × incremental was saved before the kill
    names = sorted(p.name for p in (a / "results").iterdir())
    assert len(names) == 4 and names == sorted(p.name for p in (b / "results").iterdir())
    _same_files(a, b, [*(f"results/{n}" for n in names), "results.json", "table.csv",
                       "accuracy_matrix.csv"])
    _assert_same(torch.load(a / "keys.pt", weights_only=True),
                 torch.load(b / "keys.pt", weights_only=True))


def _toy_argv(out: Path) -> list[str]:
    return ["kvb", "toy", "--seeds", "0", "1", "--models", "mlp", "--steps", "20",
            "--resolution", "8", "--test-points", "50", "--no-progress", "--out", str(out)]


def test_kvb_toy_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    import narrows.kvb.toy as toy
    import narrows.runs as runs

    run_seeds, trained = toy.run_seeds, []

    def recording(seeds, *args, **kwargs):
        trained.append(list(seeds))
        return run_seeds(seeds, *args, **kwargs)

    monkeypatch.setattr(toy, "run_seeds", recording)
    # the per-seed files are written one seed after the other: killed between seed 0 and 1
    a, b, whole, resumed = _killed_then_resumed(
        _toy_argv, _patched(monkeypatch, runs, "atomic_torch_save"), 2, tmp_path, capsys)
    assert trained == [[0, 1], [0, 1], [1]]  # the resumed run trains seed 1 only
    assert whole == 2 and resumed == 1
    for seed in (0, 1):
        _assert_same(torch.load(a / f"seeds/seed{seed}_maps.pt", weights_only=True),
                     torch.load(b / f"seeds/seed{seed}_maps.pt", weights_only=True))
    _same_files(a, b, ["seeds/seed0.json", "seeds/seed1.json", "results.json", "toy.csv"])


def test_kvb_sweep_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    import csv

    import narrows.cli.kvb_toy as cli

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("command: kvb toy\n"
                     "options: {seeds: [0], models: [mlp], resolution: 8, test_points: 50}\n"
                     "grid:\n  steps: [5, 10]\n  train_points: [20]\n")

    def argv(out: Path) -> list[str]:
        return ["kvb", "sweep", str(sweep), "--no-progress", "--out", str(out)]

    a, b, whole, resumed = _killed_then_resumed(
        argv, _patched(monkeypatch, cli, "execute_toy"), 2, tmp_path, capsys)
    assert whole == 2 and resumed == 1  # the first run had finished
    names = sorted(p.name for p in (a / "runs").iterdir())
    assert len(names) == 2 and names == sorted(p.name for p in (b / "runs").iterdir())
    _same_files(a, b, [f"runs/{n}/{f}" for n in names for f in ("results.json", "toy.csv")])

    def rows(directory: Path) -> list[dict[str, str]]:
        table = list(csv.DictReader((directory / "results.csv").open()))
        return [{**r, "status": r["status"].replace("done before", "done")} for r in table]

    assert rows(a) == rows(b)  # the same table, but for 'done before' on the finished run
