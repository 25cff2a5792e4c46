"""The ``narrows ssl knn|linear|attention|patch-probe|multilabel|finetune`` commands as a new user
runs them: on an ``ssl train`` checkpoint, on its ``ssl export`` (class tokens kept and
dropped) and on a random timm ViT; the files each writes, the feature cache a rerun reuses, and
one-line errors for bad input that leave --out untouched."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import same_rows  # noqa: E402

from narrows.cli import main  # noqa: E402

DATA = "shapes:classes=3,size=32,train=48,test=24,objects=2,rmin=18,rmax=28"
QUIET = ["--device", "cpu", "--threads", "1", "--no-progress"]
RANDOM = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
          "depth=2,embed_dim=48,num_heads=2,patch_size=8", "--image-size", "32"]
SOURCES = ("checkpoint", "keep", "drop", "random")
#: the layout each source is read as (printed and stored in every result)
LAYOUT = {"checkpoint": "narrows-ssl", "keep": "narrows-card", "drop": "narrows-card",
          "random": "init"}
TOKENS = {"checkpoint": 2, "keep": 2, "drop": 1, "random": 2}
VERB_ARGS = {
    "knn": [],
    "linear": ["--epochs", "2", "--feature", "cls@2"],  # the ViTs here have 2 blocks
    "attention": ["--images", "2"],
    "patch-probe": ["--epochs", "2"],
    "multilabel": ["--epochs", "2"],
    "finetune": ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8"],
}


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``narrows <argv>`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A smoke ``ssl train`` checkpoint and its two exports, made once."""
    root = tmp_path_factory.mktemp("ssl-eval")
    run = root / "pretrain"
    code, _, err = _run(["ssl", "train", "--preset", "smoke", "--data", DATA, "--epochs", "1",
                         "--no-knn", "--out", str(run), *QUIET])
    assert code == 0, err
    sources = {"checkpoint": ["--checkpoint", str(run / "checkpoint.pt")], "random": RANDOM}
    for tokens in ("keep", "drop"):
        file = root / f"{tokens}.safetensors"
        code, _, err = _run(["ssl", "export", "--checkpoint", str(run / "checkpoint.pt"),
                             "--class-tokens", tokens, "--output", str(file)])
        assert code == 0, err
        sources[tokens] = ["--checkpoint", str(file)]
    return {"root": root, "sources": sources, "done": {}}


def _outcome(workspace, verb: str, source: str, *extra: str) -> tuple[int, str, str, Path]:
    """Run ``ssl <verb>`` on ``source`` once per module; (code, stdout, stderr, out dir)."""
    key = (verb, source, extra)
    if key not in workspace["done"]:
        out = workspace["root"] / f"{verb}-{source}{'-'.join(('',) + extra)}"
        args = [*VERB_ARGS[verb], *extra]
        if verb == "attention" and TOKENS[source] == 1 and "--tokens" not in extra:
            args += ["--tokens", "cls"]
        code, said, err = _run(["ssl", verb, *workspace["sources"][source], "--data", DATA,
                                "--out", str(out), *QUIET, *args])
        workspace["done"][key] = (code, said, err, out)
    return workspace["done"][key]


def _results_json(out: Path, result) -> dict:
    doc = json.loads((out / "results.json").read_text())
    assert doc["summary"] == result.summary()
    headline = result.headline()
    assert headline and {k: doc[k] for k in headline} == pytest.approx(headline, nan_ok=True)
    return doc


def _said_layout_and_summary(said: str, source: str, result) -> None:
    assert f"({LAYOUT[source]}" in said or LAYOUT[source] == "init"
    assert result.summary() in said


def _one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def _nothing_in(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# -- every verb on every source ----------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
def test_knn(workspace, source):
    from narrows.ssl.knn_eval import KNNResult

    code, said, err, out = _outcome(workspace, "knn", source)
    assert code == 0, err
    result = KNNResult.load(out / "knn.json")
    expect = (["cls", "cls+", "cls|cls+", "avgpool"] if TOKENS[source] == 2
              else ["cls", "avgpool"])
    assert result.features == expect and result.ks == [10, 20, 100, 200]
    assert result.layout == LAYOUT[source]
    if TOKENS[source] == 1:  # refused parts dropped with a note, not an error
        assert "cls+" in said and "skipping" in said
    for row in result.rows:
        assert (row["n_train"], row["n_test"]) == (48, 24) and 0 <= row["top1"] <= 1
        assert row["top5"] == 1.0  # 3 classes: the label is always among the first 5
    for feature in result.features:  # k ≥ n_train: every train image votes, the same vote
        assert result.top1(feature, 100) == result.top1(feature, 200)
    assert {"knn.csv", "knn.md", "knn.png", "results.json"} <= {p.name for p in out.iterdir()}
    assert len((out / "knn.csv").read_text().strip().splitlines()) == 1 + len(result.rows)
    doc = _results_json(out, result)
    assert doc["command"] == "ssl knn" and doc["cls/k20/top1"] == result.top1("cls", 20)
    _said_layout_and_summary(said, source, result)


@pytest.mark.parametrize("source", SOURCES)
def test_linear(workspace, source):
    from narrows.ssl.linear import LinearResult

    code, said, err, out = _outcome(workspace, "linear", source)
    assert code == 0, err
    result = LinearResult.load(out / "linear.json")
    assert result.feature == "cls@2" and result.epochs == 2 and result.layout == LAYOUT[source]
    assert sorted({row["epoch"] for row in result.rows}) == [1, 2]
    assert result.backbone_passes == 1  # the features are computed once, then cached
    assert 0 <= result.best_top1 <= 1 and result.best_lr == 0.001
    assert (out / "linear.png").exists() and (out / "linear-state.pt").exists()
    assert _results_json(out, result)["best_top1"] == result.best_top1
    _said_layout_and_summary(said, source, result)


@pytest.mark.parametrize("source", SOURCES)
def test_attention(workspace, source):
    from narrows.ssl.attention import AttentionResult

    code, said, err, out = _outcome(workspace, "attention", source)
    assert code == 0, err
    result = AttentionResult.load(out / "attention.json")
    tokens = ["cls", "cls+"][:TOKENS[source]]
    assert result.tokens == tokens and result.layout == LAYOUT[source]
    n, t, heads, gh, gw = result.maps.shape
    assert (n, t, gh, gw) == (2, len(tokens), 4, 4) and result.images.shape == (2, 3, 32, 32)
    mass = result.maps.float().sum((-1, -2))  # patch keys only: the class keys hold the rest
    assert bool((mass > 0).all()) and bool((mass <= 1 + 1e-2).all())
    assert (out / "attention-grid.png").exists()
    assert len(list((out / "attention").glob("*.png"))) == 2
    doc = _results_json(out, result)
    assert set(doc) >= {f"{token}/entropy" for token in tokens}
    _said_layout_and_summary(said, source, result)


@pytest.mark.parametrize("source", SOURCES)
def test_patch_probe(workspace, source):
    from narrows.ssl.dense import PatchProbeResult

    code, said, err, out = _outcome(workspace, "patch-probe", source)
    assert code == 0, err
    result = PatchProbeResult.load(out / "patch_probe.json")
    assert result.epochs == 2 and result.layout == LAYOUT[source]
    assert len(result.per_class_iou) == 4  # background and three shapes
    assert 0 <= result.miou <= 1 and 0 <= result.pixel_miou <= 1
    assert result.best_lr in result.lrs
    assert (out / "patch_probe.png").exists()
    assert _results_json(out, result)["miou"] == result.miou
    _said_layout_and_summary(said, source, result)


@pytest.mark.parametrize("source", SOURCES)
def test_multilabel(workspace, source):
    from narrows.ssl.dense import MultiLabelResult

    code, said, err, out = _outcome(workspace, "multilabel", source)
    assert code == 0, err
    result = MultiLabelResult.load(out / "multilabel.json")
    expect = ["cls", "cls+", "cls|cls+"] if TOKENS[source] == 2 else ["cls"]
    assert [row["feature"] for row in result.rows] == expect
    assert result.layout == LAYOUT[source]
    for row in result.rows:
        assert all(0 <= row[m] <= 1 for m in ("exact_match", "label_accuracy", "map"))
        assert row["exact_match"] <= row["label_accuracy"]  # all labels right ⇒ each right
    assert (out / "multilabel.png").exists()
    assert _results_json(out, result)["cls/map"] == result.rows[0]["map"]
    _said_layout_and_summary(said, source, result)


@pytest.mark.parametrize("source", ["checkpoint", "keep", "drop"])
def test_finetune(workspace, source):
    from narrows.models import load_model

    code, said, err, out = _outcome(workspace, "finetune", source)
    assert code == 0, err
    assert {"best.pt", "last.pt", "metrics.jsonl", "curves.png", "results.json"} <= {
        p.name for p in out.iterdir()}
    assert len((out / "metrics.jsonl").read_text().strip().splitlines()) == 1
    assert (out / "backbone.safetensors").exists() == (source == "checkpoint")
    loaded = load_model(str(out / "best.pt"))
    assert loaded.card.num_classes == 3 and loaded.model.num_prefix_tokens == TOKENS[source]
    doc = json.loads((out / "results.json").read_text())
    assert doc["epochs"] == 1 and 0 <= doc["best_top1"] <= 1


def test_a_checkpoint_and_its_export_give_the_same_numbers(workspace):
    """The teacher of checkpoint.pt and its export with both tokens kept are one network."""
    from narrows.ssl.knn_eval import KNNResult
    from narrows.ssl.linear import LinearResult

    knn = [KNNResult.load(_outcome(workspace, "knn", s)[3] / "knn.json").rows
           for s in ("checkpoint", "keep")]
    assert same_rows(*knn)
    linear = [LinearResult.load(_outcome(workspace, "linear", s)[3] / "linear.json")
              for s in ("checkpoint", "keep")]
    strip = [[{k: v for k, v in r.items() if "second" not in k} for r in x.rows] for x in linear]
    assert same_rows(*strip)


# -- the feature cache -------------------------------------------------------------------------

def test_knn_rerun_reuses_the_feature_cache(workspace, tmp_path, monkeypatch):
    import timm.layers.patch_embed as patch_embed

    from narrows.ssl.knn_eval import KNNResult

    calls = []
    real = patch_embed.PatchEmbed.forward

    def counted(self, x):
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(patch_embed.PatchEmbed, "forward", counted)
    argv = ["ssl", "knn", *RANDOM, "--data", DATA, "--out", str(tmp_path / "knn"), *QUIET,
            "--k", "5", "20"]
    code, _, err = _run(argv)
    assert code == 0, err
    # one pass over each split for all four features (and at most a one-image probe each)
    assert sorted(c for c in calls if c > 1) == [24, 48] and sum(calls) <= 48 + 24 + 2
    first = KNNResult.load(tmp_path / "knn" / "knn.json")
    assert first.provenance["compute"]["features_from_cache"] is False
    calls.clear()
    code, said, err = _run(argv)
    assert code == 0, err
    assert calls == []  # no backbone pass
    assert "read from the cache" in said
    again = KNNResult.load(tmp_path / "knn" / "knn.json")
    assert again.provenance["compute"]["features_from_cache"] is True
    assert same_rows(again.rows, first.rows)


# -- bad input: exit 2, one line, nothing in --out ---------------------------------------------

@pytest.fixture(scope="module")
def resnet_file(workspace):
    """A resnet20_cifar state dict saved with torch.save: a file that fits no layout."""
    from narrows.models import create

    file = workspace["root"] / "resnet.pt"
    torch.save(create("resnet20_cifar", num_classes=10).state_dict(), file)
    return file


def _refused(tmp_path, argv: list[str]) -> str:
    out = tmp_path / "out"
    code, _, err = _run([*argv, "--out", str(out), *QUIET])
    line = _one_line_error(code, err)
    assert _nothing_in(out), sorted(p.name for p in out.iterdir())
    return line


@pytest.mark.parametrize("verb", list(VERB_ARGS))
def test_a_missing_checkpoint_is_one_line(verb, tmp_path):
    line = _refused(tmp_path, ["ssl", verb, "--checkpoint", str(tmp_path / "nope.pt"),
                               "--data", DATA, *VERB_ARGS[verb]])
    assert "nope.pt" in line and "does not exist" in line


@pytest.mark.parametrize("verb", list(VERB_ARGS))
def test_a_file_that_fits_no_layout_is_one_line(verb, tmp_path, resnet_file):
    line = _refused(tmp_path, ["ssl", verb, "--checkpoint", str(resnet_file), "--data", DATA,
                               *VERB_ARGS[verb]])
    assert "fits no known checkpoint layout" in line and "conv1.weight" in line


@pytest.mark.parametrize("argv, says", [
    (["linear", *RANDOM, "--feature", "bogus"], "--feature bogus"),
    (["linear", *RANDOM, "--feature", "cls@4"], "'cls@4' asks for the last 4 blocks"),
    (["patch-probe", *RANDOM, "--data", "digits"], "shapes"),
    (["multilabel", *RANDOM, "--data", "shapes:classes=3,size=32,train=48,test=24"],
     "objects >= 2"),
    (["finetune", "--data", DATA], "--checkpoint"),
    (["knn", *RANDOM, "--features", "bogus"], "'bogus'"),
    (["multilabel", *RANDOM, "--features", "cls|bogus"], "'cls|bogus'"),
], ids=["linear-feature", "linear-depth", "patch-digits", "multilabel-one-object",
        "finetune-no-checkpoint", "knn-features", "multilabel-features"])
def test_bad_options_are_one_line(argv, says, tmp_path):
    if "--data" not in argv:
        argv = [*argv, "--data", DATA]
    line = _refused(tmp_path, ["ssl", *argv])
    assert says in line


def test_cls_plus_of_a_one_token_export_is_refused(workspace, tmp_path):
    for tokens in (["--tokens", "cls+"], []):  # asked for, or by default (cls and cls+)
        line = _refused(tmp_path, ["ssl", "attention", *workspace["sources"]["drop"], "--data",
                                   DATA, "--images", "2", *tokens])
        assert "cls+" in line and "--tokens cls" in line


def test_too_many_blocks_names_the_depth_in_the_fix(tmp_path):
    line = _refused(tmp_path, ["ssl", "linear", *RANDOM, "--data", DATA, "--feature", "cls@4"])
    assert "1-token" not in line and "@2" in line


def test_finetune_prints_a_readable_summary(workspace):
    code, said, err, _ = _outcome(workspace, "finetune", "keep")
    assert code == 0, err
    assert "TrainResult(" not in said and "EvalResult(" not in said


def test_attention_on_image_files_needs_no_data(tmp_path):
    from PIL import Image

    from narrows.ssl.attention import AttentionResult

    files = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        path = tmp_path / f"picture{i}.png"
        Image.new("RGB", (45, 50), colour).save(path)  # not square, not the model's size
        files.append(str(path))
    out = tmp_path / "out"
    assert main(["ssl", "attention", *RANDOM, "--image", *files, "--out", str(out),
                 "--no-progress", "--threads", "1"]) == 0
    result = AttentionResult.load(out / "attention.json")
    assert result.names == ["picture0", "picture1"] and result.images.shape[-2:] == (32, 32)
    assert len(list((out / "attention").glob("*.png"))) == 2


def test_finetune_of_a_cnn_with_the_recipes_drop_path_is_one_line(tmp_path, random_checkpoint):
    checkpoint = random_checkpoint("shapes:classes=3,size=32,train=24,test=12")  # resnet20_cifar
    line = _refused(tmp_path, ["ssl", "finetune", "--checkpoint", checkpoint, "--epochs", "1"])
    assert "drop_path_rate" in line and "--drop-path 0" in line
