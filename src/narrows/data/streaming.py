"""One pass over a data set, in order, batch by batch, that a killed run resumes.

Methods that run a model over a whole data set once (decompose's histograms, kvb's embeddings,
ssl's cached features) hand :func:`stream_dataset` a step (what to do with a batch) and the
state that step fills (anything with ``state_dict``/``load_state_dict``). The order is fixed
(no shuffling), so saving the state with the number of images done is enough to continue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from narrows.runs.files import atomic_torch_save
from narrows.runtime import format_duration

Say = Callable[[str], None]
PARTIAL_FORMAT = 1


class Resumable(Protocol):
    """What a pass fills: its state can be saved and put back."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class Streaming:
    """How a pass runs: images go to ``device`` in batches of ``batch_size`` loaded by
    ``workers`` processes (0 = this one); ``progress`` shows a bar; ``say`` (e.g. ``print``)
    gets the work to do and, after two batches, the estimated time. With ``resume`` (a file
    path) the state is saved there every ``save_every`` batches and removed when the pass ends.
    """

    device: torch.device | str = "cpu"
    batch_size: int = 256
    workers: int = 0
    progress: bool = True
    say: Say | None = None
    resume: str | Path | None = None
    save_every: int = 200


def stream_dataset(
    dataset: Dataset,
    step: Callable[[Tensor, Tensor], None],
    state: Resumable,
    how: Streaming = Streaming(),
    *,
    key: Mapping[str, Any] | None = None,
    desc: str = "pass",
) -> int:
    """Call ``step(images on how.device, labels)`` on every batch of ``dataset`` in order and
    return the number of images passed; ``step`` updates ``state``.

    A partial file of an earlier call continues the pass when it was written for the same
    ``key`` (what else decides the result: model, options), data set length and batch size;
    any other file, or one that cannot be read, starts the pass over. ``desc`` names the pass
    in the bar and messages.
    """
    from tqdm.auto import tqdm

    device = torch.device(how.device)
    total = len(dataset)  # type: ignore[arg-type]
    stamp = {"format": PARTIAL_FORMAT, "key": dict(key or {}), "total": total,
             "batch_size": how.batch_size}
    done = _restore(state, how.resume, stamp)
    if done < total:
        if how.say is not None:
            how.say(f"{desc}: {total - done} images to go"
                    + (f" (resuming after {done})" if done else "")
                    + f", {-(-(total - done) // how.batch_size)} batches of {how.batch_size}")
        loader = DataLoader(Subset(dataset, range(done, total)), batch_size=how.batch_size,
                            shuffle=False, num_workers=how.workers,
                            pin_memory=device.type == "cuda")
        bar = tqdm(total=total, initial=done, desc=desc, unit="img", leave=False,
                   disable=None if how.progress else True)
        started = time.perf_counter()
        for batch, (images, labels) in enumerate(loader, 1):
            step(images.to(device, non_blocking=True), torch.as_tensor(labels))
            done += len(images)
            bar.update(len(images))
            if batch == 2 and how.say is not None:  # the first batch carries the warm-up
                _say_rate(how, device, started, total - done)
            if how.resume is not None and batch % how.save_every == 0 and done < total:
                atomic_torch_save(how.resume, {**stamp, "done": done, "state": state.state_dict()})
        bar.close()
    if how.resume is not None:
        Path(how.resume).unlink(missing_ok=True)
    return done


def _say_rate(how: Streaming, device: torch.device, started: float, left: int) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = 2 * how.batch_size / max(time.perf_counter() - started, 1e-9)
    assert how.say is not None
    how.say(f"≈ {format_duration(left / rate)} to go at {rate:,.0f} images/s")


def _restore(state: Resumable, resume: str | Path | None, stamp: dict[str, Any]) -> int:
    """Images done according to the partial file at ``resume`` (its state loaded into
    ``state``), or 0 with ``state`` untouched."""
    if resume is None or not Path(resume).is_file():
        return 0
    try:
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        if any(saved.get(name) != value for name, value in stamp.items()):
            return 0
        done = int(saved["done"])
        if not 0 <= done <= stamp["total"]:
            return 0
    except Exception:  # noqa: BLE001 - a damaged file of any kind: start over
        return 0
    fresh = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.state_dict().items()}
    try:
        state.load_state_dict(saved["state"])
    except Exception:  # noqa: BLE001 - a state of another shape: start over from a clean state
        state.load_state_dict(fresh)
        return 0
    return done


class Collected:
    """What a pass keeps in memory: named tensors of each batch (float, on the CPU) and the
    labels (int64), joined on demand; a resumable state for :func:`stream_dataset`."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}
        self.labels: list[Tensor] = []

    def add(self, parts: Mapping[str, Tensor], labels: Tensor) -> None:
        """Keep one batch: ``parts`` (name → [B, ...]) and its ``labels`` [B]."""
        for name, value in parts.items():
            self.parts.setdefault(name, []).append(value.float().cpu())
        self.labels.append(labels.long().cpu())

    def joined(self) -> tuple[dict[str, Tensor], Tensor]:
        """Every part as one tensor [N, ...] and the labels [N] (joined once: saving a
        partial file stays linear in N)."""
        self.parts = {k: [torch.cat(v)] for k, v in self.parts.items() if v}
        self.labels = [torch.cat(self.labels)] if self.labels else []
        return ({k: v[0] for k, v in self.parts.items()},
                self.labels[0] if self.labels else torch.empty(0, dtype=torch.long))

    def state_dict(self) -> dict[str, Any]:
        parts, labels = self.joined()
        return {"parts": parts, "labels": labels}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts, labels = dict(state["parts"]), state["labels"]
        if labels.ndim != 1 or any(len(v) != len(labels) for v in parts.values()):
            raise ValueError("saved parts and labels do not match")
        self.parts = {k: [v] for k, v in parts.items() if len(v)}
        self.labels = [labels] if len(labels) else []
