"""Experiment logging to TensorBoard or Weights & Biases: one small interface for every loop.

A :class:`RunLogger` takes scalars (``train/loss`` per step, ``epoch/test_top1`` per epoch),
matplotlib figures and the resolved config. The base class logs nothing (logging is off by
default); :func:`open_logger` picks :class:`TensorBoardLogger` (event files in
``<run>/tensorboard/``) or :class:`WandbLogger`. Both packages are optional extras
(``narrows[tensorboard]``, ``narrows[wandb]``); this module imports neither until asked.

Only the writing rank of a distributed job should log: :meth:`narrows.runs.RunDir.
attach_logger` opens a real logger on that rank only.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from narrows.config import option
from narrows.errors import UserError, optional_import

LOG_CHOICES = ("tensorboard", "wandb")
FEATURES = {"tensorboard": "logging to TensorBoard", "wandb": "logging to W&B"}
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"  # the W&B run id, so that a resumed run continues the same one


LOGGING = "logging (TensorBoard, W&B)"


@dataclasses.dataclass
class LogOptions:
    """The logging options of a long-running command (neither affects its results)."""

    log: Literal["tensorboard", "wandb"] | None = option(
        None, "also log scalars per step and epoch, figures and the config to TensorBoard "
        "(event files in <out>/tensorboard/; needs pip install 'narrows[tensorboard]') or to "
        "Weights & Biases (configure it, e.g. WANDB_MODE=offline, as W&B documents; needs "
        "pip install 'narrows[wandb]'); off by default. Under torchrun write --log-to (torchrun "
        "reads --log as its own --log-dir)", affects_result=False, group=LOGGING,
        short="--log-to")  # a second long name: no torchrun option starts with it
    log_project: str = option("narrows", "the W&B project the run is logged to (with --log "
                              "wandb)", affects_result=False, group=LOGGING)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` for anything else (text, bools, NaN, tensors of
    more than one element)."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, numbers.Real):
        item = getattr(value, "item", None)
        size = getattr(value, "numel", getattr(value, "size", None))
        size = size() if callable(size) else size
        if not callable(item) or size != 1:
            return None
        value = item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
    number = float(value)
    return number if math.isfinite(number) else None


def tagged(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``values`` under ``prefix/name`` tags (others are left out)."""
    out = {}
    for name, value in values.items():
        number = _number(value)
        if number is not None:
            out[f"{prefix}/{name}" if prefix else str(name)] = number
    return out


class RunLogger:
    """Logs nothing: the logger of a run without ``--log`` (and of non-writing ranks).

    Subclasses write to a backend; every method is safe to call after :meth:`close`.
    """

    active = False  # loops skip the work of gathering per-step values when False

    def __init__(self) -> None:
        self.config_logged = False
        self.closed = False

    def config(self, values: Mapping[str, Any]) -> None:
        """Record the run's resolved config (options) once."""
        self.config_logged = True
        if not self.closed:
            self._config(dict(values))

    def scalars(self, values: Mapping[str, Any], step: int, *, prefix: str = "") -> None:
        """Log the finite numbers of ``values`` at ``step`` as ``prefix/name`` (text, bools and
        non-finite values are skipped)."""
        numbers_ = tagged(values, prefix)
        if numbers_ and not self.closed:
            self._scalars(numbers_, int(step))

    def figure(self, tag: str, fig: Any, step: int) -> None:
        """Log the matplotlib figure ``fig`` as an image at ``step`` (the figure stays open:
        the caller closes it)."""
        if not self.closed:
            self._figure(tag, fig, int(step))

    def resume_at(self, step: int) -> None:
        """Say that a resumed run logs again from ``step``: what a killed run logged at this
        step or later (the unfinished epoch it redoes) is dropped from the curves (TensorBoard;
        W&B keeps every point it was sent)."""
        if not self.closed:
            self._resume_at(int(step))

    def close(self) -> None:
        """Flush and finish; idempotent."""
        if not self.closed:
            self.closed = True
            self._close()

    # backends override these
    def _config(self, values: dict[str, Any]) -> None:
        pass

    def _scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def _figure(self, tag: str, fig: Any, step: int) -> None:
        pass

    def _resume_at(self, step: int) -> None:
        pass

    def _close(self) -> None:
        pass


class StepBuffer:
    """Per-step values of a training loop, kept on the device and logged together under
    ``prefix`` by :meth:`flush`, which the loop calls where it already looks at the loss: one
    transfer per flush instead of a wait for the accelerator at every step."""

    def __init__(self, logger: RunLogger | None, prefix: str = "train") -> None:
        self.logger, self.prefix = logger, prefix
        self.active = logger is not None and logger.active
        self.rows: list[tuple[int, Mapping[str, Any], dict[str, float]]] = []

    def add(self, step: int, tensors: Mapping[str, Any], **numbers: float) -> None:
        """Keep ``step``'s one-element ``tensors`` and plain ``numbers`` (when logging)."""
        if self.active:
            self.rows.append((step, tensors, numbers))

    def flush(self) -> None:
        """Log the kept steps, and forget them."""
        if not self.rows:
            return
        import torch

        names = sorted(self.rows[0][1])
        values = torch.stack([torch.stack([tensors[n].detach().float().reshape(()) for n in names])
                              for _, tensors, _ in self.rows]).tolist()
        for (step, _, numbers_), row in zip(self.rows, values, strict=True):
            self.logger.scalars({**dict(zip(names, row, strict=True)), **numbers_}, step,
                                prefix=self.prefix)
        self.rows.clear()


def _config_text(values: Mapping[str, Any]) -> str:
    """The config as YAML, indented as a Markdown code block (TensorBoard's text tab)."""
    import yaml

    from narrows.runs.run import _plain

    text = yaml.safe_dump(_plain(dict(values)), sort_keys=False, default_flow_style=False)
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoardLogger(RunLogger):
    """Event files in ``directory`` (a run's ``tensorboard/`` folder), read by ``tensorboard
    --logdir``; the config is a text entry named ``config``. Nothing is written before the first
    point or figure (a finished run given ``--log`` again leaves no config-only event file)."""

    active = True

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        optional_import("tensorboard", extra="tensorboard", feature=FEATURES["tensorboard"])
        self.directory = Path(directory)
        # a resumed run's config is in the event files already
        self.config_logged = any(self.directory.glob("events.out.tfevents.*"))
        self._writer: Any = None
        self._config_text: str | None = None  # written with the first point

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, opened on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.directory))
            if self._config_text is not None:
                self._writer.add_text("config", self._config_text, global_step=0)
        return self._writer

    def _config(self, values: dict[str, Any]) -> None:
        self._config_text = _config_text(values)
        if self._writer is not None:
            self._writer.add_text("config", self._config_text, global_step=0)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def _figure(self, tag: str, fig: Any, step: int) -> None:
        self.writer.add_image(tag, _figure_pixels(fig), global_step=step, dataformats="HWC")

    def _resume_at(self, step: int) -> None:
        # TensorBoard discards earlier events at or after the step of a session START
        # (what SummaryWriter(purge_step=...) writes when it opens)
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=step, file_version="brain.Event:2"))
        self.writer.file_writer.add_event(Event(step=step,
                                                session_log=SessionLog(status=SessionLog.START)))

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def _figure_pixels(fig: Any) -> Any:
    """The RGB pixels (H, W, 3 uint8) of a matplotlib figure, drawn without closing it
    (``SummaryWriter.add_figure`` would close it)."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"))


class WandbLogger(RunLogger):
    """A Weights & Biases run (``wandb.init``), resumed when ``directory`` was logged before.

    The run id is kept in ``directory/wandb_id.txt``, so a resumed narrows run continues the
    same W&B run and an overwritten one (emptied directory) starts a new one. Each prefix of
    the tags (``train``, ``epoch``, ...) has its own x axis, ``<prefix>/step``, so per-step
    and per-epoch values (and the steps a resumed run repeats) may come in any order. W&B's own
    settings (``WANDB_MODE=offline``, the entity ...) are the user's to set.
    """

    active = True

    def __init__(self, directory: str | Path, project: str = "narrows", name: str | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.wandb = optional_import("wandb", extra="wandb", feature=FEATURES["wandb"])
        self.directory = Path(directory)
        run_id = wandb_run_id(self.directory)
        try:
            self.run = self.wandb.init(project=project, name=name, dir=str(self.directory),
                                       config=dict(config) if config is not None else None,
                                       id=run_id, resume="allow")
        except Exception as exc:  # wandb's own errors: no API key, no network, ...
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"W&B could not start a run ({type(exc).__name__}: {reason})",
                            "run 'wandb login', or set WANDB_MODE=offline to log on this "
                            "machine only") from None
        keep_run_id(self.directory, run_id)
        self.config_logged = config is not None
        self.axes: set[str] = set()  # the prefixes whose x axis is defined
        self.wandb.define_metric("step")

    def _config(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        by_prefix: dict[str, dict[str, float]] = {}
        for tag, value in values.items():
            by_prefix.setdefault(tag.split("/", 1)[0] if "/" in tag else "", {})[tag] = value
        for prefix, group in by_prefix.items():
            axis = f"{prefix}/step" if prefix else "step"
            if prefix and prefix not in self.axes:
                self.axes.add(prefix)
                self.wandb.define_metric(axis)
                self.wandb.define_metric(f"{prefix}/*", step_metric=axis)
            self.wandb.log({**group, axis: step})

    def _figure(self, tag: str, fig: Any, step: int) -> None:
        self.wandb.log({tag: self.wandb.Image(fig), "step": step})

    def _close(self) -> None:
        self.run.finish()


class RunDirLogger(RunLogger):
    """The logger a run directory carries (:meth:`narrows.runs.RunDir.attach_logger`): it opens
    its backend on first use, so a command refused before it trains writes and starts nothing,
    and opens it again after :meth:`close`, so a run trained twice (from Python) logs twice.

    ``open_backend()`` opens the backend (claiming the directory first).
    """

    active = True

    def __init__(self, open_backend: Callable[[], RunLogger]) -> None:
        super().__init__()
        self.open_backend = open_backend
        self.backend: RunLogger | None = None

    def _open(self) -> RunLogger:
        if self.backend is None:
            self.backend = self.open_backend()
            self.config_logged = self.backend.config_logged
        return self.backend

    def config(self, values: Mapping[str, Any]) -> None:
        backend = self._open()
        if not backend.config_logged:  # a resumed TensorBoard run has it already
            backend.config(values)
        self.config_logged = True

    def scalars(self, values: Mapping[str, Any], step: int, *, prefix: str = "") -> None:
        self._open().scalars(values, step, prefix=prefix)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self._open().figure(tag, fig, step)

    def resume_at(self, step: int) -> None:
        self._open().resume_at(step)

    def close(self) -> None:
        """Flush and finish the backend, if open; the next use opens it again."""
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()


def wandb_run_id(directory: Path) -> str:
    """The W&B run id of the run directory ``directory``: read from its ``wandb_id.txt``, or
    a new random one (kept there by :func:`keep_run_id` once W&B has started)."""
    import secrets

    file = Path(directory) / WANDB_ID_FILE
    if file.is_file():
        text = file.read_text(encoding="utf-8").strip()
        if text and all(c.isalnum() or c in "-_" for c in text):
            return text
    return f"narrows-{secrets.token_hex(8)}"


def keep_run_id(directory: Path, run_id: str) -> None:
    """Write ``run_id`` to ``directory/wandb_id.txt`` (a resumed run reads it back)."""
    from narrows.runs.files import atomic_write_text

    file = Path(directory) / WANDB_ID_FILE
    if not file.is_file() or file.read_text(encoding="utf-8").strip() != run_id:
        atomic_write_text(file, run_id + "\n")


def check_kind(kind: str | None) -> None:
    """Refuse a ``log`` value that names no backend, or one whose package does not import (so
    a command can refuse before it writes anything)."""
    if kind is not None and kind not in LOG_CHOICES:
        raise UserError(f"unknown `log` {kind!r}", f"use one of: {', '.join(LOG_CHOICES)}")
    if kind is not None:  # imported now, so that a broken install also fails before writing
        optional_import(kind, extra=kind, feature=FEATURES[kind])


def open_logger(kind: str | None, directory: str | Path, *,
                config: Mapping[str, Any] | None = None, name: str | None = None,
                project: str = "narrows") -> RunLogger:
    """The logger ``kind`` (``None``: the no-op logger; else one of :data:`LOG_CHOICES`) of the
    run directory ``directory``, with ``config`` recorded. TensorBoard writes to
    ``directory/tensorboard/``; W&B logs ``name`` (default: the directory's name) in
    ``project``. A missing package is a :class:`UserError` naming its extra.
    """
    check_kind(kind)
    if kind is None:
        return RunLogger()
    directory = Path(directory)
    logger: RunLogger
    if kind == "tensorboard":
        logger = TensorBoardLogger(directory / TENSORBOARD_DIR)
    else:
        logger = WandbLogger(directory, project=project, name=name or directory.name,
                             config=config)
    if config is not None and not logger.config_logged:
        logger.config(config)
    return logger
