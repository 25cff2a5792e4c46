"""A model's layers by dotted name: find one, run the model up to it, capture its output.

Layers are addressed by their dotted name in ``model.named_modules()`` (``"layer2"``,
``"features.17"``, ``"stages.1"``, ``"blocks.6"``). Every hook registered here lives only for
one call or one ``with`` block and is removed on exit, also after an error.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from narrows.errors import UserError

TENSOR_FIX = "choose a layer whose output is a single tensor"


class _Stop(Exception):
    """Raised by a capture hook: the layers after the captured one are not needed."""


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module of ``model`` called ``name`` (dotted); a UserError lists close names when
    there is none."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"top-level names: {', '.join(n for n in names if '.' not in n)}"
    raise UserError(f"the model has no layer '{name}'", f"give a dotted module name; {hint}")


@contextmanager
def hooked(module: nn.Module, hook: Callable[..., Any], *, pre: bool = False,
           prepend: bool = False) -> Iterator[RemovableHandle]:
    """Inside the block, ``hook`` is a forward hook of ``module`` (a forward pre-hook with
    ``pre``), registered before its other hooks with ``prepend``; it is removed on exit, even
    after an error. Yields the hook's handle."""
    handle = (module.register_forward_pre_hook(hook, prepend=prepend) if pre
              else module.register_forward_hook(hook, prepend=prepend))
    try:
        yield handle
    finally:
        handle.remove()


def tensor_output(name: str, output: object, fix: str = TENSOR_FIX) -> torch.Tensor:
    """``output`` of layer ``name`` when it is a tensor; a :class:`UserError` saying ``fix``
    otherwise."""
    if not isinstance(output, torch.Tensor):
        raise UserError(f"layer '{name}' returns {type(output).__name__}, not a tensor", fix)
    return output


def run_to(model: nn.Module, module: nn.Module, x: torch.Tensor, *, output: bool = False) -> Any:
    """Run ``model(x)`` only until ``module`` is reached: its first input (or, with ``output``,
    its output; the first element of a tuple output), ``None`` if the pass never calls it.
    The hook is removed on return."""
    captured: list[Any] = []

    def pre_hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        captured.append(inputs[0])
        raise _Stop

    def post_hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, tuple | list) else out)
        raise _Stop

    with hooked(module, post_hook if output else pre_hook, pre=not output):
        try:
            model(x)
        except _Stop:
            pass
    return captured[0] if captured else None


def run_to_layer(model: nn.Module, name: str, inputs: torch.Tensor) -> torch.Tensor:
    """The output of layer ``name`` for ``inputs``; the model is not run past that layer.

    A layer that is missing, returns other than a tensor or is never called is a
    :class:`UserError`.
    """
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        captured.append(tensor_output(name, output))
        raise _Stop

    with hooked(get_layer(model, name), hook):
        try:
            model(inputs)
        except _Stop:
            pass
    if not captured:
        raise UserError(f"layer '{name}' was not called during the forward pass",
                        "choose a layer that the model's forward actually uses")
    return captured[0]


@contextmanager
def capture(model: nn.Module, names: str | Sequence[str],
            store: dict[str, torch.Tensor] | None = None, *,
            fix: str = TENSOR_FIX) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, every forward pass of ``model`` stores the output of each layer in
    ``names`` (one dotted name or several) in the yielded dict (``store``, or a new one), by name; the hooks are removed on exit, even after an error.

    The forward runs in full (use :func:`run_to_layer` to stop early). A missing layer, or one
    whose output is not a tensor, is a :class:`UserError` (saying ``fix``).
    """
    store = {} if store is None else store
    names = [names] if isinstance(names, str) else list(names)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            store[name] = tensor_output(name, output, fix)
        return hook

    with ExitStack() as stack:
        for name in names:
            stack.enter_context(hooked(get_layer(model, name), hook_for(name)))
        yield store
