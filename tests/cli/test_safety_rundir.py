"""Damaged files inside a run directory (or a file narrows wrote and a user passes back) are
refused with one ``error:`` line naming the file, exit 2 — never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from narrows.cli import main

DATA = "shapes:classes=2,size=16,train=24,test=8"
SMOKE = ["--preset", "smoke", "--images", "2", "--no-only-correct", "--no-progress",
         "--contexts", "2", "--batch-size", "16", "--device", "cpu", "--threads", "1"]
TOY = ["--seeds", "3", "--models", "mlp", "--steps", "5", "--resolution", "4",
       "--train-points", "40", "--test-points", "40", "--no-progress", "--threads", "1"]


def _one_error(capsys, code: int, file: Path) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(file) in lines[0] and "Traceback" not in err, err
    return lines[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def interactions_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rundir") / "interactions"
    assert main(["interactions", "run", "--model", "resnet20_cifar", "--data", DATA,
                 "--out", str(out), *SMOKE]) == 0
    return out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rundir") / "toy"
    assert main(["kvb", "toy", "--out", str(out), *TOY]) == 0
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _drop_grid(path: Path) -> None:
    meta = json.loads(path.read_text())
    del meta["grid"]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("name, damage", [
    ("dv.npy", _truncate),
    ("pairs.npy", lambda p: p.write_bytes(b"junk")),
    ("meta.json", lambda p: p.write_text("{not json")),
    ("meta.json", _drop_grid),
    ("meta.json", lambda p: p.write_text('{"ratios": 1, "orders": [], "grid": 2, '
                                         '"image_ids": [], "labels": []}')),
])
def test_interactions_plot_refuses_damaged_result(interactions_run, tmp_path, capsys, name,
                                                  damage):
    run = _copy(interactions_run, tmp_path)
    damage(run / name)
    capsys.readouterr()
    code = main(["interactions", "plot", str(run), "--out", str(tmp_path / "fig.png")])
    line = _one_error(capsys, code, run / name)
    assert "overwrite" in line and not (tmp_path / "fig.png").exists()


def test_interactions_run_refuses_damaged_per_image_cache(interactions_run, tmp_path, capsys):
    import numpy as np

    run = _copy(interactions_run, tmp_path)
    cached = sorted((run / "images").glob("*.npz"))[0]
    with np.load(cached) as data:
        record = {k: data[k] for k in data.files}
    record["dv"] = record["dv"][:, :1]  # the wrong shape
    np.savez(cached, **record)
    capsys.readouterr()
    code = main(["interactions", "run", "--model", "resnet20_cifar", "--data", DATA,
                 "--out", str(run), *SMOKE])
    _one_error(capsys, code, cached)
    _truncate(cached)
    code = main(["interactions", "run", "--model", "resnet20_cifar", "--data", DATA,
                 "--out", str(run), *SMOKE])
    _one_error(capsys, code, cached)


@pytest.mark.parametrize("name, damage", [
    ("seeds/seed3.json", lambda p: p.write_text("[1, 2")),
    ("seeds/seed3.json", lambda p: p.write_text('{"seed": 3}')),
    ("seeds/seed3.json", lambda p: p.write_text(
        '{"seed": 3, "evaluations": [{"model": "mlp", "label": "MLP", "prune": null, '
        '"per_class": "junk", "used": null}]}')),
    ("seeds/seed3_maps.pt", _truncate),
    ("seeds/seed3_maps.pt", lambda p: p.write_bytes(b"\x80\x02K\x01.")),  # a pickled int
])
def test_kvb_toy_refuses_damaged_per_seed_result(toy_run, tmp_path, capsys, name, damage):
    run = _copy(toy_run, tmp_path)
    damage(run / name)
    capsys.readouterr()
    code = main(["kvb", "toy", "--out", str(run), *TOY])
    assert "overwrite" in _one_error(capsys, code, run / name)


def test_metrics_file_with_junk_is_one_line(tmp_path):
    from narrows.errors import UserError
    from narrows.runs import RunDir

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n[1, 2\n')
    with pytest.raises(UserError, match="metrics.jsonl"):
        RunDir(tmp_path).read_metrics()


WRAPPED = '{"format": "narrows.decompose.indices/1", "indices": {"0": [0], "1": [1]}, '


@pytest.mark.parametrize("content", ['{"0": ["a"], "1": [2]}', '{"0": 1, "1": [2]}',
                                     '[[0.5], [1]]', '{"0": [0], "1": [true]}', "{oops",
                                     WRAPPED + '"num_channels": "x"}',
                                     WRAPPED + '"num_channels": [4]}',
                                     WRAPPED + '"num_channels": true}'])
def test_indices_file_with_wrong_types_is_one_line(tmp_path, content):
    from narrows.decompose import ClassIndices
    from narrows.errors import UserError

    path = tmp_path / "indices.json"
    path.write_text(content)
    for known in ({"num_classes": 2, "num_channels": 4}, {}):
        with pytest.raises(UserError, match="indices.json"):
            ClassIndices.load(path, **known)
