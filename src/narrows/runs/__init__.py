"""Run directories: every command writes its config, metrics, results and figures to one place."""

from narrows.runs.files import (
    atomic_savefig,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from narrows.runs.run import RunDir, default_out, safe_name

__all__ = [
    "RunDir",
    "atomic_savefig",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "default_out",
    "safe_name",
]
