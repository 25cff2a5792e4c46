"""A run directory: the resolved config, ``metrics.jsonl``, results and figures.

Re-running the same command on the same directory resumes it; a config that differs in any
option that affects results is refused unless ``overwrite`` is set. Nothing is written before a
command's options are valid: opening a run only checks the directory; it is created, and its
config written, with the first file written into it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from narrows import __version__
from narrows.errors import UserError
from narrows.runs.files import (
    atomic_write_json,
    atomic_write_text,
    claim_on_first_write,
    forget_claim,
)

T = TypeVar("T")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


def safe_name(name: str, what: str) -> str:
    """``name`` unchanged when it can be one file or directory name inside a run directory.

    Refused with one :class:`UserError` (never silently rewritten, so the user finds the run
    under the name they gave): an empty name, a path separator, NUL, an absolute path, or a
    name made only of dots (``.``, ``..``). ``what`` names the option in the message.
    """
    text = str(name)
    if not text.strip():
        bad = "it is empty"
    elif "\0" in text:
        bad = "it contains a NUL character"
    elif text.startswith(("/", "\\")):
        bad = "it is an absolute path"
    elif "/" in text or "\\" in text:
        bad = "it contains a path separator"
    elif not text.strip("."):
        bad = "it is only dots"
    else:
        return text
    raise UserError(f"{what} {text!r} cannot name a directory: {bad}",
                    f"give a plain {what}: one name, without '/', '\\' or '..'")


def default_out(command: str, *parts: str) -> Path:
    """``runs/<command>/<part>-<part>`` from the ``parts`` given (empty ones skipped), with each
    part reduced to safe file-name characters."""
    name = "-".join(re.sub(r"[^A-Za-z0-9_.=]+", "_", p).strip("_") for p in parts if p)
    name = re.sub(r"^\.+", "_", name)  # never '.', '..' or a hidden directory
    return Path("runs") / command / name if name else Path("runs") / command


class RunDir:
    """Owns one output directory for one command, ``path``.

    Only rank 0 of a distributed job writes (``writer=False`` elsewhere); the others can still
    read what is there.
    """

    def __init__(self, path: str | Path, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self._pending: dict[str, Any] | None = None  # the config to write on the first write
        from narrows.runs.logger import RunLogger

        self.logger: RunLogger = RunLogger()  # logs nothing until attach_logger

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        command: str,
        config: dict[str, Any],
        result_config: dict[str, Any],
        *,
        overwrite: bool = False,
        writer: bool = True,
    ) -> RunDir:
        """Check ``path`` for ``command``; returns the run, resumed when possible.

        A new directory is created, and ``config.yaml`` written, only with the first file the
        command writes into it (any atomic write under ``path`` does it, or :meth:`claim`), so a
        command refused after this call leaves nothing behind. A directory that holds nothing
        but a config (left by a command refused before it wrote anything) is taken over. With
        ``overwrite`` an existing narrows run is emptied now.
        """
        run = cls(path, writer=writer)
        saved = run._saved_config()
        # a config and nothing else: a command refused before it wrote anything left it there,
        # so there is no run to resume or to protect
        if saved is not None and run._holds_only_config():
            pass
        elif saved is not None:
            if saved.get("command") != command and not overwrite:
                raise UserError(
                    f"{run.path} holds a '{saved.get('command')}' run, not '{command}'",
                    "choose another --out, or pass --overwrite to replace it",
                )
            diff = _differences(saved.get("result_options", {}), _plain(result_config))
            if diff and not overwrite:
                raise UserError(
                    f"{run.path} was made with different options ({diff})",
                    "rerun with the same options to resume, choose another --out, or pass --overwrite",
                )
            if overwrite and writer:
                run.clear()
        elif run.path.exists() and not run._is_empty():
            if not overwrite:
                raise UserError(
                    f"{run.path} exists and is not a narrows run directory",
                    "choose another --out (an empty or new directory)",
                )
            raise UserError(
                f"refusing to --overwrite {run.path}: it is not a narrows run directory",
                "choose another --out",
            )
        if writer and saved is not None and not overwrite:
            run._remove_stale_temporaries()
        if writer:
            run._pending = {"command": command, "narrows_version": __version__,
                            "options": _plain(config), "result_options": _plain(result_config)}
            if overwrite:
                run.claim()  # the old run is gone: say at once whose directory it is
            else:
                claim_on_first_write(run.path, run)
        return run

    def _remove_stale_temporaries(self) -> None:
        """Delete the temporary files of atomic writes that a killed run left behind
        (``.<name>.<random>.tmp``; a finished write renames its file, so none is current)."""
        for stale in self.path.rglob(".*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)

    def claim(self) -> None:
        """Create the directory and write the pending config (done by the first write)."""
        if self._pending is None or not self.writer:
            return
        doc, self._pending = self._pending, None
        forget_claim(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        import yaml

        self.write_text(CONFIG_FILE, yaml.safe_dump(doc, sort_keys=False))

    def _holds_only_config(self) -> bool:
        """True when the directory's only file is its ``config.yaml``."""
        config = self.path / CONFIG_FILE
        return config.is_file() and all(f.is_dir() or f == config for f in self.path.rglob("*"))

    def _is_empty(self) -> bool:
        """True when the directory holds no files (empty folders only)."""
        return all(f.is_dir() for f in self.path.rglob("*"))

    def clear(self) -> None:
        """Delete everything in a narrows run directory (only called on ``--overwrite``)."""
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # -- logging ---------------------------------------------------------------------------
    def attach_logger(self, kind: str | None, *, config: dict[str, Any] | None = None,
                      project: str = "narrows", name: str | None = None) -> Any:
        """Give this run the logger ``kind`` (``None``, ``"tensorboard"`` or ``"wandb"``; see
        :func:`narrows.runs.logger.open_logger`) as :attr:`logger`, and return it.

        The kind and its package are checked now; the backend opens (claiming the directory)
        when the first value is logged, so a command refused before it trains leaves nothing.
        ``config`` (default: the run's options) is recorded then; W&B names the run ``name``
        (default: the directory's name) in ``project``. Only the writing rank logs; the others
        get the no-op logger. A logger attached before is closed.
        """
        from narrows.runs.logger import RunDirLogger, RunLogger, check_kind, open_logger

        check_kind(kind)

        def open_backend() -> RunLogger:
            self.claim()
            options = config if config is not None else (self.read_config() or {}).get("options")
            return open_logger(kind, self.path, config=options, project=project,
                               name=name or self.path.name)

        self.logger.close()
        self.logger = (RunDirLogger(open_backend) if kind is not None and self.writer
                       else RunLogger())
        return self.logger

    def close(self) -> None:
        """Flush and finish the run's logger backend, if open; idempotent. Logging to the run
        again opens it again (a new event file; the same W&B run)."""
        self.logger.close()

    # -- config ----------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        """The run's config: the one it was opened with, else the one saved in the directory."""
        if self._pending is not None:
            return dict(self._pending)
        return self._saved_config()

    def _saved_config(self) -> dict[str, Any] | None:
        import yaml

        file = self.path / CONFIG_FILE
        if not file.is_file():
            return None
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or "command" not in data:
            raise UserError(f"{file} is damaged", "delete the directory or pass --overwrite")
        return data

    def write_config(self, command: str, config: dict[str, Any], result_config: dict[str, Any]) -> None:
        import yaml

        doc = {
            "command": command,
            "narrows_version": __version__,
            "options": _plain(config),
            "result_options": _plain(result_config),
        }
        self.write_text(CONFIG_FILE, yaml.safe_dump(doc, sort_keys=False))

    # -- files -----------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_text(self, name: str, text: str) -> Path | None:
        self.claim()
        return atomic_write_text(self.path / name, text) if self.writer else None

    def write_json(self, name: str, obj: Any) -> Path | None:
        self.claim()
        return atomic_write_json(self.path / name, _plain(obj)) if self.writer else None

    def read_json(self, name: str, *, required_keys: tuple[str, ...] = (),
                  kind: type | None = None) -> Any:
        """A JSON file of this run; a damaged one is one line naming it (see ``read_json_file``)."""
        from narrows.runs.files import read_json_file

        return read_json_file(self.path / name, "JSON result file", required_keys=required_keys,
                              kind=kind)

    def save_figure(self, name: str, fig: Any, *, close: bool = True) -> Path | None:
        """Write ``fig`` atomically (format from ``name``'s suffix) and close it (``close``)."""
        from narrows.runs.files import atomic_savefig

        self.claim()
        try:
            return (atomic_savefig(self.path / name, fig, dpi=120, bbox_inches="tight")
                    if self.writer else None)
        finally:
            if close:
                from narrows.plotting import pyplot

                pyplot().close(fig)

    def write_table(self, stem: str, rows: list[dict[str, Any]],
                    columns: list[str] | None = None) -> Path | None:
        """``stem.csv`` and ``stem.md`` of ``rows`` (see :mod:`narrows.runs.tables`); the CSV path."""
        from narrows.runs.tables import csv_text, markdown_text

        self.write_text(f"{stem}.md", markdown_text(rows, columns))
        return self.write_text(f"{stem}.csv", csv_text(rows, columns))

    def cached(self, name: str, compute: Callable[[], T], load: Callable[[Path], T],
               save: Callable[[T, Path], Any]) -> T:
        """The step every resumable command repeats: ``load(file)`` when ``name`` exists in
        this run, else ``compute()``, ``save(result, file)`` (on the writing rank) and return it."""
        file = self.path / name
        if file.exists():
            return load(file)
        result = compute()
        if self.writer:
            self.claim()
            self.path.mkdir(parents=True, exist_ok=True)
            save(result, file)
        return result

    # -- metrics ---------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        file = self.path / METRICS_FILE
        if not file.is_file():
            return []
        from narrows.runs.files import reading

        rows = []
        with reading(file, "metrics file (one JSON object a line)"):
            for line in file.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("a line is not a JSON object")
                    rows.append(row)
        return rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` atomically (it stays consistent with the last checkpoint)."""
        self.write_text(METRICS_FILE, "".join(json.dumps(_plain(r)) + "\n" for r in rows))


def _plain(obj: Any) -> Any:
    """Convert tuples, paths and numpy/torch scalars into YAML/JSON-friendly values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def _differences(saved: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(new))
    changed = [f"{k}: {saved.get(k)!r} → {new.get(k)!r}" for k in keys if saved.get(k) != new.get(k)]
    if len(changed) > 3:
        changed = changed[:3] + [f"and {len(changed) - 3} more"]
    return "; ".join(changed)
