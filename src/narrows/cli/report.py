"""``narrows report RUN_DIR... --out report.html``: one self-contained page of any runs."""

from __future__ import annotations

from dataclasses import dataclass

from narrows.cli.app import command
from narrows.config import non_negative, option


@dataclass
class ReportConfig:
    runs: list[str] = option([], "run directories of any narrows commands, or folders holding "
                             "runs (every run under them)", positional=True, metavar="RUN_DIR")
    out: str = option("report.html", "the page to write", metavar="FILE.html")
    title: str | None = option(None, "the page's title [default: narrows report]")
    max_figures: int = option(40, "figures shown per run, in name order (the others are "
                              "counted); 0: none", check=non_negative)


def execute(cfg: ReportConfig) -> int:
    from narrows.runs.report import write_report

    print(write_report(cfg.runs, cfg.out, title=cfg.title, max_figures=cfg.max_figures).summary())
    return 0


command(
    "report", ReportConfig, execute,
    summary="one self-contained HTML page of any runs: summaries, tables, figures",
    description="Reads what the runs saved (config.yaml, results.json, metrics.jsonl, CSV "
    "tables, figures) and writes one HTML file with every figure embedded: no network, no "
    "scripts, so it can be mailed or archived. Per run: command, options, provenance, summary "
    "line, tables and figures; several runs of one command also get a side-by-side table: the "
    "options that change results and differ between them, and the results that differ.",
    epilog="examples:\n  narrows report runs/quickstart --out quickstart.html\n"
    "  narrows report runs/train/a runs/train/b runs/train/c --title 'learning rates'")
