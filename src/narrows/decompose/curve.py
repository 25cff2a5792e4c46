"""Accuracy of the decomposed model, at one set of indices or as a function of k.

The curve computes each batch's pooled features once and scores every (source, k) head on
them; each head's weights come from :class:`DecomposedLinear`, so a point of the curve is the
accuracy :func:`validate` gives for the same indices. At ``k = D`` every source keeps every
channel and the head is the original layer bit for bit.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from narrows.data.streaming import Streaming, stream_dataset
from narrows.decompose.head import DecomposedLinear, decompose
from narrows.decompose.indices import ClassIndices
from narrows.decompose.parts import split_head
from narrows.runs.files import atomic_write_json, atomic_write_text

IndexSource = Callable[[int], ClassIndices]


def _test_split(data: Any) -> Dataset:
    """A data set as given, or the test split of a :class:`~narrows.data.DataBundle`."""
    return data.test() if callable(getattr(data, "test", None)) else data


def validate(
    model: nn.Module,
    data: Any,
    indices: ClassIndices | None = None,
    *,
    normalizer: Callable[[Tensor], Tensor],
    how: Streaming = Streaming(progress=False),
) -> Any:
    """Top-1/top-5/loss (:class:`~narrows.training.EvalResult`) of ``model`` on ``data`` (a
    data set or a bundle's test split), decomposed with ``indices`` when given; images are
    normalised with ``normalizer``; ``how`` gives the device, batch size, workers and bar."""
    from narrows.training import evaluate

    net = decompose(model, indices) if indices is not None else model
    return evaluate(net.to(how.device), _test_split(data), normalizer, torch.device(how.device),
                    batch_size=how.batch_size, workers=how.workers, progress=how.progress)


@dataclass
class Curve:
    """Decomposed top-1 accuracy per source (``histogram``, ``random``, ``top-weights``, ...)
    and k, beside the full model's top-1 on the same ``n`` images."""

    ks: list[int]
    top1: dict[str, list[float]]
    full: float
    n: int
    meta: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"source": source, "k": k, "top1": acc}
            for source, values in self.top1.items()
            for k, acc in zip(self.ks, values, strict=True)
        ]

    def at(self, source: str, k: int) -> float:
        return self.top1[source][self.ks.index(k)]

    def to_json(self) -> dict[str, Any]:
        return {"ks": self.ks, "top1": self.top1, "full_top1": self.full, "n": self.n,
                "meta": self.meta}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Curve:
        return cls(list(data["ks"]), dict(data["top1"]), float(data["full_top1"]),
                   int(data["n"]), dict(data.get("meta", {})))

    def to_rows(self) -> list[dict[str, Any]]:
        """Flat records for CSV and pandas: :meth:`rows`."""
        return self.rows()

    def summary(self) -> str:
        """One line: each source's top-1 at the largest k, and the full model's."""
        k = self.ks[-1] if self.ks else None
        parts = [f"{s} {100 * self.at(s, k):.2f}%" for s in self.top1] if k is not None else []
        return (f"top-1 at k = {k}: " + ", ".join(parts) + "; " if parts else "") + \
            f"full model {100 * self.full:.2f}% on {self.n} images"

    def save(self, directory: str | Path) -> None:
        """``curve.json`` (after the header) and ``curve.csv`` (one column per source) in
        ``directory``."""
        from narrows.decompose.saving import decompose_header

        directory = Path(directory)
        atomic_write_json(directory / "curve.json",
                          {**decompose_header("curve", self.meta), **self.to_json()})
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["k", *self.top1, "full"])
        for i, k in enumerate(self.ks):
            writer.writerow([k, *(f"{v[i]:.6f}" for v in self.top1.values()), f"{self.full:.6f}"])
        atomic_write_text(directory / "curve.csv", text.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Curve:
        """Read ``curve.json`` (``path``: the file or the directory :meth:`save` wrote to)."""
        from narrows.runs.files import reading
        from narrows.runs.results import read_result_json

        what, fix = "accuracy curve file", "run 'narrows decompose validate' again"
        document = read_result_json(path, "decompose.curve", 1, what, fix, file_name="curve.json",
                                    required_keys=("ks", "top1", "full_top1", "n"))
        with reading(path, what, fix):
            return cls.from_json(document)

    def table(self, ks: Sequence[int] | None = None) -> str:
        """A Markdown table of top-1 (%) per k (rows) and source (columns)."""
        ks = [k for k in (ks or self.ks) if k in self.ks]
        head = "| k | " + " | ".join(self.top1) + " |"
        lines = [head, "|---" * (len(self.top1) + 1) + "|"]
        for k in ks:
            cells = " | ".join(f"{100 * self.at(s, k):.2f}" for s in self.top1)
            lines.append(f"| {k} | {cells} |")
        lines.append(f"| full model | {100 * self.full:.2f} |" + " |" * (len(self.top1) - 1))
        return "\n".join(lines)

    def plot(self, ax: Any = None, title: str | None = None) -> tuple[Any, Any]:
        """Top-1 (%) against k (log axis), one line per source, the full model dashed."""
        from narrows.plotting import pyplot

        plt = pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(5.6, 3.8))
        else:
            fig = ax.figure
        for source, values in self.top1.items():
            ax.plot(self.ks, [100 * v for v in values], marker="o", markersize=3, label=source)
        ax.axhline(100 * self.full, color="black", linestyle="--", linewidth=1,
                   label="full model")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (channels per class)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title or "decomposed final layer: accuracy vs k", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig, ax


@torch.no_grad()
def accuracy_curve(
    model: nn.Module,
    data: Any,
    sources: Mapping[str, IndexSource],
    ks: Sequence[int],
    *,
    normalizer: Callable[[Tensor], Tensor],
    how: Streaming = Streaming(progress=False),
) -> Curve:
    """Decomposed top-1 of ``model`` (not yet decomposed) on ``data`` for each source and k,
    in one pass (``how``: device, batch size, workers, bar).

    ``sources[name](k)`` gives the indices of that source at k (e.g. ``extraction.indices``,
    ``lambda k: ClassIndices.random(C, D, k, seed)``, ``lambda k: top_weights(linear, k)``),
    for each k of ``ks``; images are normalised with ``normalizer``.
    """
    device = torch.device(how.device)
    model.eval().to(device)
    features, linear = split_head(model)
    ks = sorted({int(k) for k in ks if 1 <= int(k) <= linear.in_features})
    heads = {
        (name, k): DecomposedLinear(linear, source(k)).to(device).effective_weight()
        for name, source in sources.items()
        for k in ks
    }
    tally = _Tally({key: torch.zeros((), dtype=torch.int64, device=device)
                    for key in [*heads, "full"]})

    def step(images: Tensor, labels: Tensor) -> None:
        labels = labels.to(device)
        h = features(normalizer(images))
        tally.add("full", linear(h), labels)
        for key, weight in heads.items():
            tally.add(key, F.linear(h, weight, linear.bias), labels)

    n = stream_dataset(_test_split(data), step, tally, how, desc="accuracy vs k")
    top1 = {name: [float(tally.correct[(name, k)]) / max(n, 1) for k in ks] for name in sources}
    return Curve(ks, top1, float(tally.correct["full"]) / max(n, 1), n)


class _Tally:
    """Correct top-1 predictions per head so far (a pass's state)."""

    def __init__(self, correct: dict[Any, Tensor]) -> None:
        self.correct = correct

    def add(self, key: Any, logits: Tensor, labels: Tensor) -> None:
        self.correct[key] += (logits.argmax(1) == labels).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"correct": self.correct}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.correct = state["correct"]
