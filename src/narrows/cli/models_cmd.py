"""``narrows models``: list model names (narrows' own first, then timm's)."""

from __future__ import annotations

from dataclasses import dataclass

from narrows.cli.app import command
from narrows.config import option


@dataclass
class ModelsConfig:
    pattern: str = option("*", "shell-style pattern, e.g. 'resnet*' or '*cifar*'",
                          positional=True)


def execute(cfg: ModelsConfig) -> int:
    from narrows.models import list_models

    names = list_models(cfg.pattern)
    for name in names:
        print(name)
    if not names:
        print(f"no model matches '{cfg.pattern}'")
    return 0


command(
    "models", ModelsConfig, execute,
    summary="list the model names narrows can build (timm's registry plus narrows' own)",
    description="List model names matching a pattern. Every timm model works; narrows adds "
    "resnet{20,32,44,56,110}_cifar (option-A shortcuts) and alexnet_cifar.")
