"""The result contract (narrows.runs.results) for the ssl evaluation result classes: kNN, linear,
patch and multi-label probes, attention maps and the method comparison."""

from __future__ import annotations

import json
import math
import statistics

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from tiny import SSL_TINY, SSL_VIT, check_result_contract  # noqa: E402

from narrows.runs.results import provenance  # noqa: E402
from narrows.ssl.compare import ComparisonResult  # noqa: E402
from narrows.ssl.eval_options import (  # noqa: E402
    AttentionOptions,
    KNNOptions,
    LinearOptions,
    MultiLabelOptions,
    PatchProbeOptions,
)

DATA = "shapes:classes=3,size=32,train=24,test=12,objects=2,rmin=18,rmax=28"
QUIET = {"say": None, "progress": False}


@pytest.fixture(scope="module")
def subject():
    """A random 2-token tiny ViT and the data, shared by every case."""
    from narrows.data import load
    from narrows.ssl.backbones import load_eval_backbone

    backbone = load_eval_backbone(model=SSL_VIT, model_kwargs=dict(SSL_TINY), image_size=32)
    return backbone, load(DATA, image_size=32)


def _knn(subject, tmp):
    from narrows.ssl.knn_eval import evaluate_knn

    return evaluate_knn(*subject, KNNOptions(k=[1, 5, 20]), **QUIET)


def _linear(subject, tmp):
    from narrows.ssl.linear import linear_probe

    return linear_probe(*subject, LinearOptions(feature="cls@2", lr=[0.01, 0.1], epochs=2,
                                                batch_size=8), **QUIET)


def _patch(subject, tmp):
    from narrows.ssl.dense import patch_probe

    return patch_probe(*subject, PatchProbeOptions(lr=[0.01, 0.1], epochs=1, batch_size=8),
                       **QUIET)


def _multilabel(subject, tmp):
    from narrows.ssl.dense import multilabel_probe

    return multilabel_probe(*subject, MultiLabelOptions(lr=[0.01, 0.1], epochs=1), **QUIET)


def _attention(subject, tmp):
    from narrows.ssl.attention import visualise_attention

    return visualise_attention(*subject, AttentionOptions(images=2, threshold=0.6))


def _comparison(subject=None, tmp=None, origin: dict | None = None) -> ComparisonResult:
    result = ComparisonResult(rows=[], data=DATA, notes=["tiny"],
                              provenance=origin if origin is not None else provenance(seed=0))
    for seed, (udi, dino) in enumerate([(0.5, 0.4), (0.7, 0.45), (0.6, 0.35)]):
        result.add("udi", seed, "knn_cls", udi)
        result.add("dino", seed, "knn_cls", dino)
        result.add("udi", seed, "patch_miou", udi / 2)
    return result


# (build, file name to save to, the file holding the header, kind)
CASES = {
    "KNNResult": (_knn, "knn.json", "knn.json", "ssl.knn"),
    "LinearResult": (_linear, "linear.json", "linear.json", "ssl.linear"),
    "PatchProbeResult": (_patch, "patch_probe.json", "patch_probe.json", "ssl.patch_probe"),
    "MultiLabelResult": (_multilabel, "multilabel.json", "multilabel.json", "ssl.multilabel"),
    "AttentionResult": (_attention, "attention.json", "attention.json", "ssl.attention"),
    "ComparisonResult": (_comparison, "comparison.json", "comparison.json", "ssl.comparison"),
}
#: the classes an ``ssl`` command writes results.json from (``flat_summary`` reads headline())
COMMAND_RESULTS = [n for n in CASES if n != "ComparisonResult"]


@pytest.fixture(scope="module")
def built(subject, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("built")
    return {name: case[0](subject, tmp) for name, case in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_contract(name, built, tmp_path):
    from narrows.plotting import pyplot

    _, file, header_file, kind = CASES[name]
    x = built[name]
    assert type(x).__name__ == name
    check_result_contract(x, tmp_path, file, header_file, kind)
    assert type(x).load(tmp_path / file).summary() == x.summary()
    assert list(json.loads((tmp_path / header_file).read_text()))[:2] == ["format", "provenance"]
    fig, ax = x.plot()
    assert ax.figure is fig  # one axes
    pyplot().close(fig)


@pytest.mark.parametrize("name", COMMAND_RESULTS)
def test_headline_is_flat_numbers_and_feeds_results_json(name, built):
    from narrows.runs.results import flat_summary

    x = built[name]
    headline = x.headline()
    assert headline and all(isinstance(k, str) for k in headline)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in headline.values())
    doc = flat_summary(x, command=f"ssl {name}")
    assert doc["summary"] == x.summary() and {k: doc[k] for k in headline} == headline
    json.dumps(doc)  # results.json is plain JSON


def test_headline_numbers_are_the_rows(built):
    """The headline repeats measured numbers (not new ones)."""
    knn = built["KNNResult"]
    for row in knn.rows:
        assert knn.headline()[f"{row['feature']}/k{row['k']}/top1"] == row["top1"]
    linear = built["LinearResult"].headline()
    assert linear["best_top1"] == max(v for k, v in linear.items() if k.endswith("/top1"))
    assert linear["best_lr"] in (0.01, 0.1)
    patch = built["PatchProbeResult"]
    assert patch.headline()["miou"] == patch.miou and 0 <= patch.miou <= 1
    multi = built["MultiLabelResult"]
    assert {k.rsplit("/", 1)[0] for k in multi.headline()} == {"cls", "cls+", "cls|cls+"}
    assert all(0 <= v <= 1 for v in multi.headline().values())


def test_attention_maps_round_trip_exactly(built, tmp_path):
    import torch

    x = built["AttentionResult"]
    x.save(tmp_path / "a.json")
    back = type(x).load(tmp_path / "a.json")
    assert torch.equal(back.maps, x.maps) and torch.equal(back.images, x.images)
    assert back.tokens == x.tokens == ["cls", "cls+"] and back.threshold == x.threshold


def test_comparison_stats_are_mean_and_sample_std():
    result = _comparison()
    values = [0.5, 0.7, 0.6]
    mean, spread, n = result.stats("udi", "knn_cls")
    assert n == 3 and mean == pytest.approx(statistics.fmean(values))
    assert spread == pytest.approx(statistics.stdev(values))  # n − 1, not pstdev
    assert spread != pytest.approx(statistics.pstdev(values))
    assert result.stats("dino", "patch_miou") == (pytest.approx(math.nan, nan_ok=True),
                                                  pytest.approx(math.nan, nan_ok=True), 0)
    one = ComparisonResult(rows=[])
    one.add("a", 0, "m", 0.25)
    assert one.stats("a", "m") == (0.25, 0.0, 1)


def test_comparison_table_is_mean_pm_std_in_points():
    result = _comparison()
    table = {row["method"]: row for row in result.table()}
    udi = [0.5, 0.7, 0.6]
    expect = f"{100 * statistics.fmean(udi):.1f} ± {100 * statistics.stdev(udi):.1f}"
    assert table["udi"]["knn_cls"] == expect == "60.0 ± 10.0"
    dino = [0.4, 0.45, 0.35]
    assert table["dino"]["knn_cls"] == (f"{100 * statistics.fmean(dino):.1f} ± "
                                        f"{100 * statistics.stdev(dino):.1f}")
    assert table["dino"]["patch_miou"] == "–"  # never measured
    assert list(table) == ["udi", "dino"] and "60.0 ± 10.0" in result.markdown()


def test_comparison_without_provenance_still_records_versions(tmp_path):
    result = ComparisonResult(rows=[], data=DATA)
    result.add("udi", 0, "knn_cls", 0.5)
    result.save(tmp_path / "c.json")
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["provenance"]["versions"]["torch"]


def test_a_result_of_another_kind_is_refused(built, tmp_path):
    from narrows.errors import UserError
    from narrows.ssl.knn_eval import KNNResult

    _comparison().save(tmp_path / "c.json")
    with pytest.raises(UserError, match="c.json"):
        KNNResult.load(tmp_path / "c.json")
    built["KNNResult"].save(tmp_path / "k.json")
    with pytest.raises(UserError, match="k.json"):
        ComparisonResult.load(tmp_path / "k.json")
