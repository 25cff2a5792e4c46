"""The result of a pretraining run: per-epoch losses against ln K, and the teacher's kNN."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_KIND, FORMAT_VERSION = "ssl_pretraining", 1
LEVEL_NAMES = {"g_cl": "cls (global)", "l_cl": "cls (local)", "g_mcl": "cls+ (global)",
               "l_mcl": "cls+ (local)", "g_pch": "patch"}


@dataclass
class PretrainResult:
    """What ``narrows ssl train`` measured.

    ``metrics`` has one row per epoch (``loss``, the terms ``g_cl, g_mcl, g_pch, l_cl, l_mcl``
    present for the method, ``entropy_cls``, ``lr``, ``wd``, ``momentum``, ``teacher_temp``,
    ``images_per_second``, ...); ``knn`` maps a moment (``"init"``, ``"epoch N"``) to the
    teacher's kNN top-1 (cls token, k = 20, T = 0.07) on the data's labels.
    """

    method: str
    model: str
    data: str
    out_dim: int
    epochs: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    knn: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def ln_k(self) -> float:
        """ln K: the loss of a uniform (collapsed) prediction."""
        return math.log(self.out_dim)

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat record per epoch."""
        return [{"method": self.method, **row} for row in self.metrics]

    def summary(self) -> str:
        """``UDI on shapes: 10 epochs, loss 5.12 → 3.40 (ln K 5.55), kNN 31.0% → 52.5%``."""
        text = f"{self.method.upper()} {self.model} on {self.data}: {len(self.metrics)} epochs"
        if self.metrics:
            first, last = self.metrics[0]["loss"], self.metrics[-1]["loss"]
            text += f", loss {first:.3f} → {last:.3f} (ln K {self.ln_k:.2f})"
        if "init" in self.knn and len(self.knn) > 1:
            final = list(self.knn.values())[-1]
            text += (f", teacher kNN top-1 {100 * self.knn['init']:.1f}% at init → "
                     f"{100 * final:.1f}%")
        return text

    def headline(self) -> dict[str, float | int | None]:
        """The flat numbers of ``results.json``: ``epochs`` trained, the first and final
        ``loss`` (``first_loss``, ``final_loss``), ``ln_k`` and, when measured, the teacher's
        kNN top-1 at initialisation and at the end (``knn_top1_init``, ``knn_top1_final``)."""
        found: dict[str, float | int | None] = {"epochs": len(self.metrics),
                                                "ln_k": self.ln_k}
        if self.metrics:
            found["first_loss"] = self.metrics[0].get("loss")
            found["final_loss"] = self.metrics[-1].get("loss")
        if "init" in self.knn:
            found["knn_top1_init"] = self.knn["init"]
        later = [value for moment, value in self.knn.items() if moment != "init"]
        if later:
            found["knn_top1_final"] = later[-1]
        return found

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """Each loss term per epoch against ln K (the collapse level); returns ``(fig, ax)``."""
        from narrows.plotting import axes

        fig, ax = axes(ax)
        epochs = [row["epoch"] for row in self.metrics]
        ax.plot(epochs, [row["loss"] for row in self.metrics], marker="o", color="black",
                label="total")
        for name, label in LEVEL_NAMES.items():
            if self.metrics and name in self.metrics[0]:
                ax.plot(epochs, [row[name] for row in self.metrics], marker=".", label=label)
        ax.axhline(self.ln_k, linestyle="--", color="grey", label=f"ln K = {self.ln_k:.2f}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy")
        ax.set_title(f"{self.method.upper()} {self.model} on {self.data}", fontsize=9)
        ax.legend(fontsize=7)
        return fig, ax

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON with the narrows header."""
        from narrows.runs.files import atomic_write_json
        from narrows.runs.results import header

        path = Path(path)
        document = {**header(FORMAT_KIND, FORMAT_VERSION, self.provenance),
                    "method": self.method, "model": self.model, "data": self.data,
                    "out_dim": self.out_dim, "epochs": self.epochs, "metrics": self.metrics,
                    "knn": self.knn, "checkpoint": self.checkpoint}
        atomic_write_json(path, document)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PretrainResult:
        """Read what :meth:`save` wrote."""
        from narrows.runs.files import read_json_file
        from narrows.runs.results import check_header

        document = read_json_file(path, "pretraining result", "point at the pretraining.json "
                                  "of a 'narrows ssl train' run", kind=dict)
        check_header(document, FORMAT_KIND, FORMAT_VERSION, str(path))
        origin = document.pop("provenance", {})
        document.pop("format", None)
        return cls(**document, provenance=origin)
