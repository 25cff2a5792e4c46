"""Every run directory's results.json is the flat summary (command, summary line, numbers), for
the commands that wrote none before: attribution stats/explain/evaluate/sanity, interactions
run/compare, decompose essential/mutual-info and ssl train."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from narrows.cli import main

QUIET = ["--no-progress", "--threads", "1", "--device", "cpu"]
ATTRIBUTION_DATA = "shapes:classes=2,size=16,train=16,test=8"
INTERACTIONS_DATA = "shapes:classes=2,size=16,train=24,test=8"
SSL_DATA = "shapes:classes=2,size=32,train=32,test=16"
#: the few IBA steps and statistics samples that keep the attribution runs to seconds
IBA_TINY = ["--steps", "2", "--iba-batch", "2", "--n-samples", "16"]


def flat_results(run: Path) -> dict:
    """``run/results.json``, checked against the contract: the command of ``config.yaml``, a
    summary line, and only flat values (JSON scalars)."""
    assert (run / "results.json").is_file(), sorted(p.name for p in run.iterdir())
    document = json.loads((run / "results.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert document["command"] == config["command"]
    assert isinstance(document["summary"], str) and document["summary"].strip()
    assert "\n" not in document["summary"]
    for key, value in document.items():
        assert isinstance(value, (str, int, float, bool)) or value is None, (key, value)
    return document


def numbers(document: dict) -> dict:
    """The headline numbers of a results.json (not the command and summary)."""
    return {k: v for k, v in document.items() if k not in ("command", "summary")}


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> str:
    return random_checkpoint(ATTRIBUTION_DATA)


def test_attribution_stats_reused_or_not(checkpoint, tmp_path):
    out = tmp_path / "stats"
    args = ["attribution", "stats", "--checkpoint", checkpoint, "--n-samples", "12",
            "--out", str(out), *QUIET]
    assert main(args) == 0
    import torch

    saved = torch.load(out / "statistics.pt", weights_only=True)
    first = flat_results(out)
    assert first["command"] == "attribution stats"
    assert first["n"] == saved["n"] == 12 and first["layer"] == saved["layer"] == "layer2"
    assert first["elements"] == int(np.prod(saved["shape"]))
    assert 0 <= first["active_fraction"] <= 1
    (out / "results.json").unlink()
    assert main(args) == 0  # reused statistics: the summary is written again, the same
    assert flat_results(out) == first


@pytest.mark.filterwarnings("ignore:feature statistics from only")
def test_attribution_explain(checkpoint, tmp_path):
    out = tmp_path / "explain"
    assert main(["attribution", "explain", "--checkpoint", checkpoint, "--images", "2",
                 *IBA_TINY, "--select", "first", "--out", str(out), *QUIET]) == 0
    document = flat_results(out)
    assert document["command"] == "attribution explain"
    # the explain run keeps statistics.pt too, but its results.json is explain's own
    assert (out / "statistics.pt").is_file() and "n" not in document
    with np.load(out / "heatmaps.npz") as data:
        heatmaps = data["heatmaps"]
    meta = json.loads((out / "result" / "meta.json").read_text())["meta"]
    assert document["method"] == meta["method"] == "IBA"
    assert document["images"] == len(heatmaps) == 2
    assert document["mean"] == pytest.approx(float(heatmaps.astype(np.float64).mean()), rel=1e-5)


@pytest.mark.filterwarnings("ignore:feature statistics from only")
def test_attribution_evaluate(checkpoint, tmp_path):
    out = tmp_path / "evaluate"
    args = ["attribution", "evaluate", "--checkpoint", checkpoint, "--methods", "iba,random",
            "--metrics", "degradation,bbox", "--images", "2", *IBA_TINY, "--tile", "4",
            "--points", "3", "--out", str(out), *QUIET]
    assert main(args) == 0
    document = flat_results(out)
    assert document["command"] == "attribution evaluate"
    rows = {row["method"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"iba", "random"}
    for method, row in rows.items():
        for column in ("degradation_tile4", "bbox_ratio"):
            assert document[f"{method}.{column}"] == pytest.approx(float(row[column]), rel=1e-4)
    first = numbers(document)
    assert main(args) == 0  # everything cached: the same numbers again
    assert numbers(flat_results(out)) == first


@pytest.mark.filterwarnings("ignore:feature statistics from only")
def test_attribution_sanity(checkpoint, tmp_path):
    out = tmp_path / "sanity"
    assert main(["attribution", "sanity", "--checkpoint", checkpoint, "--methods", "iba,random",
                 "--images", "2", *IBA_TINY, "--randomise", "linear,layer3,layer2", "--repeats", "2",
                 "--out", str(out), *QUIET]) == 0
    document = flat_results(out)
    assert document["command"] == "attribution sanity"
    rows = list(csv.DictReader((out / "sanity.csv").open()))
    iba = [row for row in rows if row["method"] == "iba"]
    assert [row["randomised_to"] for row in iba] == ["", "linear", "layer3", "layer2"]
    assert document["iba.spearman_final"] == pytest.approx(float(iba[-1]["spearman_mean"]))
    assert document["iba.ssim_final"] == pytest.approx(float(iba[-1]["ssim_mean"]))
    assert document["iba.spearman_run_to_run"] == pytest.approx(float(iba[0]["spearman_mean"]))
    assert document["iba.spearman_final"] != pytest.approx(document["iba.spearman_run_to_run"])
    assert document["random.spearman_final"] == pytest.approx(1.0)  # the weights do not matter


INTERACTIONS_SMOKE = ["--preset", "smoke", "--images", "2", "--no-only-correct", "--contexts",
                      "2", "--batch-size", "16"]


def _curve(run: Path) -> dict[str, float]:
    """``J@<ratio>`` of the run's curve.csv (J sampled)."""
    return {f"J@{float(row['ratio']):g}": float(row["J_sampled"])
            for row in csv.DictReader((run / "curve.csv").open())}


def test_interactions_run_and_compare(tmp_path, random_checkpoint):
    checkpoint = random_checkpoint(INTERACTIONS_DATA)
    out = tmp_path / "run"
    assert main(["interactions", "run", "--checkpoint", checkpoint, "--out", str(out),
                 *INTERACTIONS_SMOKE, *QUIET]) == 0
    document = flat_results(out)
    assert document["command"] == "interactions run"
    curve = _curve(out)
    assert {k for k in document if k.startswith("J@")} == set(curve)
    for key, value in curve.items():
        assert document[key] == pytest.approx(value, rel=1e-4)
    assert document["images"] == len(json.loads((out / "meta.json").read_text())["image_ids"])

    config = tmp_path / "models.yaml"
    config.write_text(f"data: '{INTERACTIONS_DATA}'\npreset: smoke\nimages: 2\ncontexts: 2\n"
                      f"only_correct: false\nmodels:\n  - a={checkpoint}\n"
                      "  - b=resnet20_cifar\n")
    cmp = tmp_path / "cmp"
    assert main(["interactions", "compare", "--config", str(config), "--out", str(cmp),
                 *QUIET]) == 0
    document = flat_results(cmp)
    assert document["command"] == "interactions compare"
    assert document["summary"].startswith("a ") and "; b " in document["summary"]
    for label in ("a", "b"):
        assert flat_results(cmp / label)["command"] == "interactions run"
        for key, value in _curve(cmp / label).items():
            assert document[f"{label}.{key}"] == pytest.approx(value, rel=1e-4)
    assert len(numbers(document)) == 2 * len(_curve(cmp / "a"))


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    """A ResNet-20 checkpoint for 2-class 16-px shapes and its top-|W| indices."""
    from tiny import random_subject

    from narrows.decompose import ClassIndices
    from narrows.models import save_model

    root = tmp_path_factory.mktemp("decompose-subject")
    net, card = random_subject(ATTRIBUTION_DATA, class_names=True)
    save_model(root / "model.pt", net, card)
    ClassIndices.top_weights(net.linear, 5).save(root / "ind5.json")
    return root


def test_decompose_essential(subject, tmp_path):
    out = tmp_path / "ess"
    args = ["decompose", "essential", "--checkpoint", str(subject / "model.pt"), "--indices",
            str(subject / "ind5.json"), "--sigma", "0", "1", "--out", str(out), *QUIET]
    assert main(args) == 0
    document = flat_results(out)
    assert document["command"] == "decompose essential"
    rows = {float(row["sigma"]): row for row in csv.DictReader((out / "essential.csv").open())
            if row["class"] == "all"}
    assert set(rows) == {0.0, 1.0}
    assert document["ours.clean"] == pytest.approx(float(rows[1.0]["clean_rate"]))
    for sigma, row in rows.items():
        for condition in ("inf", "noninf", "random"):
            expected = float(row["clean_rate"]) - float(row[f"noise_at_{condition}_rate"])
            assert document[f"ours.drop_{condition}@{sigma:g}"] == pytest.approx(expected)
    assert len(numbers(document)) == 1 + 2 * 3
    first = numbers(document)
    assert main(args) == 0  # reused counts: the same summary again
    assert numbers(flat_results(out)) == first


def test_decompose_mutual_info(subject, tmp_path):
    out = tmp_path / "mi"
    assert main(["decompose", "mutual-info", "--indices", str(subject / "ind5.json"),
                 "--out", str(out), *QUIET]) == 0
    document = flat_results(out)
    assert document["command"] == "decompose mutual-info"
    saved = json.loads((out / "mutual_info.json").read_text())
    assert saved["ks"] == [5]
    for source, by_k in saved["scores"].items():
        assert document[f"{source}.mi@5"] == pytest.approx(by_k["5"]["upstream"])
        assert document[f"{source}.mi_no_diagonal@5"] == pytest.approx(by_k["5"]["no_diagonal"])
    assert {"ours.mi@5", "random.mi@5"} <= set(document)


def test_ssl_train(tmp_path):
    out = tmp_path / "ssl"
    args = ["ssl", "train", "--preset", "smoke", "--data", SSL_DATA, "--epochs", "1",
            "--out", str(out), *QUIET]
    assert main(args) == 0
    document = flat_results(out)
    assert document["command"] == "ssl train"
    saved = json.loads((out / "pretraining.json").read_text())
    assert document["epochs"] == len(saved["metrics"]) == 1
    assert document["final_loss"] == pytest.approx(saved["metrics"][-1]["loss"])
    assert document["knn_top1_init"] == pytest.approx(saved["knn"]["init"])
    assert document["knn_top1_final"] == pytest.approx(saved["knn"]["epoch 1"])
    (out / "results.json").unlink()
    assert main(args) == 0  # finished: resumed without training, the summary written again
    assert numbers(flat_results(out)) == numbers(document)
