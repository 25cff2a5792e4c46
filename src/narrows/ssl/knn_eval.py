"""``narrows ssl knn``: DINO's weighted-kNN accuracy of a frozen backbone's features.

One backbone pass per split gives every feature spec (``cls``, ``cls+``, ``cls|cls+``,
``avgpool`` …; cached on disk when a cache directory is given); each spec is then scored for
every k by :func:`narrows.ssl.knn.knn_evaluate`. Under torchrun every rank holds the whole
train bank and scores its share of the test images (rows ``rank::world``); the hit counts are
summed over the ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch

from narrows.runtime import Distributed

FORMAT_KIND, FORMAT_VERSION = "ssl.knn", 1
HEADLINE_K = 20


def evaluate_knn(backbone: Any, data: Any, options: Any, *, cache: str | Path | None = None,
                 device: torch.device | str = "cpu", dist: Distributed = Distributed(),
                 progress: bool = False, say: Callable[[str], None] | None = print,
                 batch_size: int = 256, workers: int = 0,
                 cache_dtype: str = "float32") -> KNNResult:
    """kNN top-1 and top-5 of ``backbone`` (an ``EvalBackbone``) on ``data`` (a
    ``DataBundle`` or a data spec): train split = the bank, test split = the queries, for every
    feature spec and k of ``options`` (``KNNOptions``: features, k, temperature, memory_mb).
    ``cache``: directory of the feature store (``None``: features in memory), holding
    ``cache_dtype`` numbers."""
    from narrows.models.features import usable_features
    from narrows.runs.results import provenance
    from narrows.ssl.backbones import backbone_features, eval_data
    from narrows.ssl.knn import knn_evaluate

    started = time.perf_counter()
    data = eval_data(backbone, data)
    specs = usable_features(backbone.vit, list(options.features), say)
    ks = sorted({int(k) for k in options.k})
    common = dict(cache=cache, device=device, batch_size=batch_size, workers=workers, dist=dist,
                  progress=progress, say=say, dtype=cache_dtype)
    train = backbone_features(backbone, data, "train", specs, **common)
    test = backbone_features(backbone, data, "test", specs, **common)
    features_seconds = time.perf_counter() - started
    num_classes = int(data.info.num_classes)
    scored = time.perf_counter()
    rows = []
    for key in specs:
        bank, queries = train[key], test[key]
        bank_features = bank.features.to(device)
        mine = slice(dist.rank, None, dist.world_size)
        results = knn_evaluate(bank_features, bank.labels.to(device),
                               queries.features[mine].to(device), queries.labels[mine],
                               num_classes=num_classes, ks=ks,
                               temperature=float(options.temperature),
                               memory_mb=int(options.memory_mb), dist=dist)
        for k in ks:
            top1, top5 = results[k]
            rows.append({"feature": key, "k": k, "top1": top1, "top5": top5,
                         "n_train": len(bank), "n_test": len(queries)})
    knn_seconds = time.perf_counter() - scored
    total = time.perf_counter() - started
    images = (len(next(iter(train.values()))) + len(next(iter(test.values()))))
    from_cache = all(t.from_cache for t in (*train.values(), *test.values()))
    opts = asdict(options) if is_dataclass(options) else dict(vars(options))
    origin = provenance(model=str(backbone.id), data=data.info.spec, options=opts,
                        compute={"device": str(device), "world_size": dist.world_size,
                                 "seconds": total, "features_from_cache": from_cache,
                                 "backbone": _backbone_facts(backbone)})
    return KNNResult(model=str(backbone.id), data=data.info.spec, layout=str(backbone.layout),
                     which=str(getattr(backbone, "which", "teacher")),
                     temperature=float(options.temperature), rows=rows,
                     seconds={"features": features_seconds, "knn": knn_seconds, "total": total},
                     images_per_second=images / total if total > 0 else math.nan,
                     provenance=origin)


def _backbone_facts(backbone: Any) -> dict[str, Any]:
    facts = getattr(backbone, "provenance", None)
    if callable(facts):
        return facts()
    return {"id": str(backbone.id), "layout": str(backbone.layout)}


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass
class KNNResult:
    """Weighted-kNN accuracies (kind ``ssl.knn``): one row per (feature, k) with ``top1`` and
    ``top5`` in [0, 1] (NaN without test images), ``n_train`` and ``n_test``; ``seconds`` of
    the feature pass, the kNN and in all; images (train + test) per second of the whole call."""

    model: str
    data: str
    layout: str
    which: str
    temperature: float
    rows: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    images_per_second: float = math.nan
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> list[str]:
        """The feature specs, in the order evaluated."""
        return list(dict.fromkeys(r["feature"] for r in self.rows))

    @property
    def ks(self) -> list[int]:
        return sorted({int(r["k"]) for r in self.rows})

    def headline_k(self) -> int | None:
        """k = 20 when measured (DINO's headline), else the smallest k."""
        ks = self.ks
        return HEADLINE_K if HEADLINE_K in ks else (ks[0] if ks else None)

    def top1(self, feature: str, k: int) -> float:
        """Top-1 accuracy of ``feature`` at ``k``."""
        for row in self.rows:
            if row["feature"] == feature and int(row["k"]) == int(k):
                return float(row["top1"])
        raise KeyError((feature, k))

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat row per (feature, k) with the model, data, layout, network and T."""
        return [{"model": self.model, "data": self.data, "layout": self.layout,
                 "which": self.which, "temperature": self.temperature, **row}
                for row in self.rows]

    def summary(self) -> str:
        """One line: top-1 at the headline k per feature, and the best feature."""
        k = self.headline_k()
        if k is None:
            return f"kNN (T {self.temperature:g}) on {self.data}: nothing measured"
        scores = {f: self.top1(f, k) for f in self.features}
        parts = " ".join(f"{f} {100 * v:.1f}%" for f, v in scores.items())
        finite = {f: v for f, v in scores.items() if not math.isnan(v)}
        best = (f"; best {max(finite, key=finite.get)} {100 * max(finite.values()):.1f}%"
                if finite else "")
        return f"kNN (T {self.temperature:g}) on {self.data}, k={k}: {parts}{best}"

    def headline(self) -> dict[str, float]:
        """Top-1 and top-5 per feature and k, as ``"<feature>/k<k>/top1"`` (results.json)."""
        return {f"{row['feature']}/k{row['k']}/{name}": row[name]
                for row in self.rows for name in ("top1", "top5")}

    def table(self) -> str:
        """A Markdown table: one row per feature, top-1 (top-5) per k, in percent."""
        ks = self.ks
        lines = ["| feature | " + " | ".join(f"k={k}" for k in ks) + " |",
                 "|---|" + "---:|" * len(ks)]
        for feature in self.features:
            cells = []
            for k in ks:
                row = next(r for r in self.rows if r["feature"] == feature and r["k"] == k)
                cells.append(f"{100 * row['top1']:.1f} ({100 * row['top5']:.1f})")
            lines.append(f"| {feature} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("provenance")
        out["rows"] = [{k: _clean(v) for k, v in row.items()} for row in self.rows]
        out["images_per_second"] = _clean(self.images_per_second)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (header first) to ``path``; returns ``path``."""
        from narrows.runs.files import atomic_write_json
        from narrows.runs.results import header

        return atomic_write_json(path, {**header(FORMAT_KIND, FORMAT_VERSION, self.provenance),
                                        **self.to_dict(), "summary": self.summary()})

    @classmethod
    def load(cls, path: str | Path) -> KNNResult:
        """The result :meth:`save` wrote to ``path`` (a file, or a directory with knn.json)."""
        from narrows.runs.files import read_json_file
        from narrows.runs.results import check_header

        file = Path(path)
        if file.is_dir():
            file = file / "knn.json"
        document = read_json_file(file, "kNN result", "run 'narrows ssl knn' again", kind=dict,
                                  required_keys=("model", "data", "rows", "temperature"))
        check_header(document, FORMAT_KIND, FORMAT_VERSION, str(file))

        def number(v: Any) -> Any:
            return math.nan if v is None else v

        rows = [{k: (number(v) if k in ("top1", "top5") else v) for k, v in row.items()}
                for row in document["rows"]]
        return cls(model=document["model"], data=document["data"],
                   layout=document.get("layout", ""), which=document.get("which", "teacher"),
                   temperature=float(document["temperature"]), rows=rows,
                   seconds=dict(document.get("seconds", {})),
                   images_per_second=float(number(document.get("images_per_second"))),
                   provenance=dict(document.get("provenance", {})))

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """Top-1 accuracy against k (log axis), one line per feature, on a new axes or
        ``ax``. Returns ``(fig, ax)``."""
        from narrows.plotting import pyplot

        if ax is None:
            fig, ax = pyplot().subplots(figsize=(5, 3.4))
        else:
            fig = ax.figure
        for feature in self.features:
            rows = sorted((r for r in self.rows if r["feature"] == feature), key=lambda r: r["k"])
            ax.plot([r["k"] for r in rows], [100 * r["top1"] for r in rows], marker="o",
                    label=feature)
        if self.ks:
            ax.set_xscale("log")
            ax.set_xticks(self.ks)
            ax.set_xticklabels([str(k) for k in self.ks])
            ax.minorticks_off()
        ax.set_xlabel("k (neighbours)")
        ax.set_ylabel("kNN top-1 (%)")
        ax.set_title(f"{self.model} on {self.data} (T {self.temperature:g})", fontsize=9)
        ax.grid(alpha=0.3)
        if self.rows:
            ax.legend(fontsize=8)
        return fig, ax
