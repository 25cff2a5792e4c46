"""The HTML report of run directories: it parses, embeds every figure, names every run, puts
several runs of one command side by side and refuses a path that holds no run."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import pytest

from narrows.errors import UserError
from narrows.runs import RunDir
from narrows.runs.report import build_report, write_report
from narrows.runs.results import header, provenance
from narrows.runs.tables import csv_cell, markdown_cell

FIGURE_SUFFIXES = (".png", ".gif", ".jpg")


class Page(HTMLParser):
    """What the tests look at in a page: images, links, ids, headings and tables."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.sources: list[str] = []
        self.ids: list[str] = []
        self.headings: list[str] = []
        self.tables: list[dict] = []  # {"class": ..., "rows": [[cell text, ...], ...]}
        self.tags: list[str] = []
        self._heading: list[str] | None = None
        self._cell: list[str] | None = None
        self._tables: list[dict] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if "href" in attrs:
            self.links.append(attrs["href"])
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if tag == "img":
            self.images.append(attrs)
        elif tag in ("h1", "h2", "h3", "h4"):
            self._heading = []
        elif tag == "table":
            self._tables.append({"class": attrs.get("class"), "rows": []})
        elif tag == "tr" and self._tables:
            self._tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3", "h4") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None:
            self._tables[-1]["rows"][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self.tables.append(self._tables.pop())

    def handle_data(self, data):
        for sink in (self._heading, self._cell):
            if sink is not None:
                sink.append(data)


def _figure(run: RunDir, name: str, colour: str) -> None:
    from narrows.plotting import pyplot

    fig, ax = pyplot().subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0], color=colour)
    run.save_figure(name, fig)


def _train_run(path: Path, lr: float, colour: str) -> RunDir:
    # the runs differ in lr (a result option) and in device and log (not result options)
    options = {"out": str(path), "lr": lr, "epochs": 2, "model": "tiny", "device": f"cuda:{lr}",
               "log": "tensorboard" if lr > 0.1 else None}
    run = RunDir.open(path, "train", options, {"lr": lr, "epochs": 2})
    run.write_metrics([{"epoch": 1, "test_top1": 0.5}, {"epoch": 2, "test_top1": 0.75 + lr}])
    run.write_json("results.json", {"command": "train", "summary": f"tiny trained with lr {lr}",
                                    "top1": 0.75 + lr, "final": {"loss": 1 / (3 + lr)},
                                    "image_size": 32})
    _figure(run, "curves.png", colour)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three train runs that differ in ``lr`` and one evaluate run with a table, a header
    file, nested figures and figures that must stay out (tensorboard, hidden folders)."""
    root = tmp_path_factory.mktemp("runs")
    made = {f"train-{i}": _train_run(root / f"train-{i}", lr, colour).path
            for i, (lr, colour) in enumerate([(0.1, "red"), (0.2, "green"), (0.05, "blue")])}
    evaluate = RunDir.open(root / "evaluate", "evaluate", {"split": "test <&>"}, {})
    evaluate.write_json("results.json", {"top1": 0.987654321, "n": 12345, "split": "test"})
    evaluate.write_table("per_class", [
        {"class": "cat", "top1": 0.123456789, "count": 1234567.0, "missing": None},
        {"class": "dog", "top1": 2.5e-05, "count": 12.0, "missing": 0.5}])
    evaluate.write_json("scores.json", {**header("demo", 1, provenance(
        model="tiny-net", data="digits", seed=7)), "values": [1, 2]})
    _figure(evaluate, "confusion.png", "black")
    _figure(evaluate, "attention/layer0.png", "orange")
    (evaluate.path / "attention" / "layer1.jpg").write_bytes(b"\xff\xd8\xff\xe0not-a-real-jpeg")
    for hidden in ("tensorboard/plot.png", ".cache/plot.png"):
        (evaluate.path / hidden).parent.mkdir(parents=True)
        (evaluate.path / hidden).write_bytes(b"\x89PNG not shown")
    made["evaluate"] = evaluate.path
    return made


def _figure_files(run: Path) -> dict[str, bytes]:
    return {f.relative_to(run).as_posix(): f.read_bytes() for f in sorted(run.rglob("*"))
            if f.suffix in FIGURE_SUFFIXES and not any(
                p.startswith(".") or p == "tensorboard" for p in f.relative_to(run).parts)}


def _embedded(page: Page) -> list[bytes]:
    return [base64.b64decode(img["src"].split("base64,", 1)[1]) for img in page.images]


def test_report_embeds_every_figure_and_names_every_run(runs):
    report = build_report(list(runs.values()))
    page = Page(report.html)
    expected = [data for run in runs.values() for data in _figure_files(run).values()]
    assert len(expected) == 3 + 3  # one per train run; two PNGs and a JPEG in evaluate
    assert sorted(_embedded(page)) == sorted(expected)
    assert all(img["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
               for img in page.images)
    assert {img["alt"] for img in page.images} >= {"attention/layer0.png", "attention/layer1.jpg"}
    for path in runs.values():  # every run has a heading and a contents entry that reaches it
        assert any(str(path) in h for h in page.headings)
    targets = [link[1:] for link in page.links if link.startswith("#")]
    assert len(set(targets) & set(page.ids)) == len(runs) + 2  # runs and the two commands
    assert len(page.ids) == len(set(page.ids))
    assert report.summary() == "4 runs of 2 commands, 6 figures (not saved)"


def test_runs_of_one_command_are_side_by_side_with_their_differing_options(runs):
    page = Page(build_report(list(runs.values())).html)
    (table,) = [t for t in page.tables if t["class"] == "side-by-side"]
    groups, names, *rows = table["rows"]
    assert groups == ["", "options that differ", "results"]
    assert "lr" in names and "epochs" not in names and "model" not in names  # same everywhere
    assert "device" not in names and "log" not in names  # they change no result
    assert "image_size" not in names  # the same result in every run: in each run's section
    assert "out" not in names  # a run's own path is its row name, not an option to compare
    assert "summary" not in names and "final.loss" in names  # nested results are flattened
    assert [row[0] for row in rows] == [str(runs[f"train-{i}"]) for i in range(3)]
    assert [row[names.index("lr")] for row in rows] == ["0.1", "0.2", "0.05"]
    assert [row[names.index("top1")] for row in rows] == [markdown_cell(0.75 + lr)
                                                        for lr in (0.1, 0.2, 0.05)]


def test_tables_numbers_and_provenance_read_as_the_project_writes_them(runs):
    page = Page(build_report([runs["evaluate"]], max_rows=1).html)
    csv_rows = [t["rows"] for t in page.tables if t["rows"] and t["rows"][0][0] == "class"]
    assert csv_rows == [[["class", "top1", "count", "missing"],
                         ["cat", markdown_cell(float(csv_cell(0.123456789))),
                          markdown_cell(1234567.0), "—"]]]
    assert csv_rows[0][1][1:3] == ["0.1235", "1.235e+06"]
    assert any("per_class.csv" in h and "first 1 of 2 rows" in h for h in page.headings)
    cells = {row[0]: row[1] for t in page.tables for row in t["rows"] if len(row) == 2}
    assert cells["top1"] == "0.9877" and cells["n"] == "12,345"
    assert cells["model"] == "tiny-net" and cells["seed"] == "7" and cells["from"] == "scores.json"
    assert "narrows" in cells["versions"]
    assert "no results.json" not in build_report([runs["evaluate"]]).html


def test_metrics_last_row_and_figure_cap(runs):
    report = build_report([runs["evaluate"], runs["train-1"]], max_figures=1)
    page = Page(report.html)
    assert len(page.images) == 2  # one of evaluate's three, the train run's one
    assert _embedded(page)[0] == _figure_files(runs["evaluate"])["attention/layer0.png"]
    assert "2 more left out" in report.html
    assert report.summary().startswith("2 runs of 2 commands, 2 figures (2 left out)")
    assert any(h.startswith("Metrics: the last of 2 rows") for h in page.headings)
    assert "Figures (1 of 3)" in page.headings and "--max-figures" in report.html
    (metrics,) = [t["rows"] for t in page.tables if t["rows"][0] == ["epoch", "test_top1"]]
    assert metrics[1] == ["2", markdown_cell(0.95)]


def test_a_folder_of_runs_reports_each_run_once_and_sorted(runs, tmp_path):
    import shutil

    root = tmp_path / "all"
    shutil.copytree(runs["evaluate"].parent, root)
    nested = RunDir.open(root / "evaluate" / "inner", "explain", {}, {})
    nested.write_json("results.json", {"summary": "inner run"})
    _figure(nested, "inner.png", "grey")
    report = build_report([root, root / "train-0"])  # train-0 is found twice: shown once
    assert [run.path for run in report.runs] == sorted([root / p.name for p in runs.values()]
                                                       + [nested.path])
    outer = next(run for run in report.runs if run.path == root / "evaluate")
    assert [f.name for f in outer.figures] == sorted(_figure_files(runs["evaluate"]))
    assert report.n_figures == 6 + 1  # the nested run's figure is its own, shown once


def test_saved_page_is_self_contained_and_escaped(runs, tmp_path):
    out = tmp_path / "deep" / "report.html"
    report = write_report(list(runs.values()), out, title="Runs <of> today")
    text = out.read_text(encoding="utf-8")
    assert text == report.html and report.summary().endswith(f"→ {out}")
    page = Page(text)
    assert "script" not in page.tags and "link" not in page.tags
    assert all(src.startswith("data:") for src in page.sources)
    assert all(link.startswith("#") for link in page.links)
    assert "http://" not in text and "https://" not in text
    assert page.headings[0] == "Runs <of> today" and "<of>" not in text
    assert "test &lt;&amp;&gt;" in text  # option values are escaped too


def test_a_path_that_holds_no_run_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "file.txt").write_text("x")
    for path in ("empty", "other", "file.txt", "missing"):
        with pytest.raises(UserError, match=str(tmp_path / path)):
            build_report([tmp_path / path])
    with pytest.raises(UserError, match="no run directories"):
        build_report([])


def test_logger_folders_name_order_and_unfinished_runs(tmp_path):
    from narrows.plotting import pyplot

    run = RunDir.open(tmp_path / "run", "train", {}, {})
    for name in ("heatmap_104.png", "heatmap_32.png", "heatmap_4.png"):
        _figure(run, name, "red")
    fig, ax = pyplot().subplots(figsize=(12, 1.5))  # a strip of panels
    ax.plot([0, 1], [0, 1])
    run.save_figure("strip.png", fig)
    for copy in ("wandb/run-1/files/media/images/curves_4.png", "tensorboard/x.png"):
        (run.path / copy).parent.mkdir(parents=True)
        (run.path / copy).write_bytes((run.path / "heatmap_4.png").read_bytes())
    run.write_metrics([{"epoch": 1, "test_top1": 0.5}, {"epoch": 2, "test_top1": 0.625}])
    page = Page(build_report([run.path]).html)
    assert [img["alt"] for img in page.images] == ["heatmap_4.png", "heatmap_32.png",
                                                   "heatmap_104.png", "strip.png"]
    (summary,) = build_report([run.path]).runs
    assert summary.summary.startswith("unfinished: 2 rows of metrics") and "0.625" in summary.summary


def test_odd_run_directories_become_notes_not_crashes(tmp_path):
    import json

    run = RunDir.open(tmp_path / "odd", "kvb train", {1: 2, "lr": 0.1}, {})
    run.write_json("results.json", [{"model": "dkvb", "protocol": "iid",
                                     "final_accuracy": 0.5}])  # an older list-shaped file
    (run.path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (run.path / "gone.json").symlink_to(tmp_path / "nowhere.json")
    (run.path / "huge.csv").write_text("a\n" + "x" * 200_000 + "\n")  # over csv's field limit
    (run.path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": float("nan")}))
    report = build_report([run.path])
    (page,) = report.runs
    assert page.results == {"dkvb/iid.final_accuracy": 0.5}
    assert page.figures == [] and page.figures_left_out == 0  # a dangling link is no file
    assert any("huge.csv" in note for note in page.notes)
    Page(report.html)  # and the page parses

