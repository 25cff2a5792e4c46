"""Every UserError raised in narrows says what is wrong *and* how to fix it (two parts)."""

from __future__ import annotations

import ast
from pathlib import Path

import narrows

SOURCE = Path(narrows.__file__).parent


def _one_part_errors() -> list[str]:
    found = []
    for file in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            starred = any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords)
            if name == "UserError" and not starred and len(node.args) + len(node.keywords) < 2:
                found.append(f"{file.relative_to(SOURCE)}:{node.lineno}")
    return found


def test_every_user_error_has_a_fix():
    assert _one_part_errors() == []
