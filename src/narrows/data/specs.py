"""Parsing data spec strings and dispatching to the loader of each kind."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from narrows.errors import UserError

if TYPE_CHECKING:  # parsing stays free of torch: the command line checks specs before importing it
    from narrows.data.base import DataBundle

SPEC_HELP = (
    "digits | shapes[:classes=4,size=64,train=2000,test=500,seed=0,rmin=22,rmax=42] | "
    "cifar10:PATH | cifar100:PATH | imagenet:PATH | folder:PATH"
)
LAYOUTS = {  # what a missing PATH should hold, for the one-line error
    "cifar10": "{root}/cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}} (the official "
               "python version); pass --download to fetch it",
    "cifar100": "{root}/cifar-100-python/{{train,test,meta}} (the official python version); pass "
                "--download to fetch it",
    "imagenet": "{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG",
    "folder": "{root}/<class>/<image>, or {root}/train/<class>/<image> and "
              "{root}/val/<class>/<image>",
}
KINDS = ("digits", "shapes", "cifar10", "cifar100", "imagenet", "folder")
NEEDS_PATH = ("cifar10", "cifar100", "imagenet", "folder")


@dataclass(frozen=True)
class ParsedSpec:
    kind: str
    argument: str  # a path, or "k=v,..." options, or "" for none


def parse_spec(spec: str) -> ParsedSpec:
    """Split the data ``spec`` ``kind:argument`` (kind lower-cased); an unknown kind or a missing
    path is a :class:`UserError`."""
    kind, _, argument = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise UserError(f"unknown data spec '{spec}'", f"use one of: {SPEC_HELP}")
    if kind in NEEDS_PATH and not argument:
        raise UserError(f"data spec '{spec}' needs a path", f"write it as {kind}:PATH")
    if kind == "digits" and argument:
        raise UserError(f"data spec '{spec}' takes no argument", "write it as: digits")
    return ParsedSpec(kind, argument)


def load(spec: str, *, download: bool = False, image_size: int | None = None) -> DataBundle:
    """Load the data set named by ``spec``.

    ``image_size`` overrides the served size of file-backed data sets (ImageNet, folders);
    ``download`` lets CIFAR fetch its archive when it is missing and the network allows it.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "digits":
        from narrows.data.digits import load_digits_bundle

        return load_digits_bundle(spec)
    if parsed.kind == "shapes":
        from narrows.data.shapes import load_shapes_bundle

        return load_shapes_bundle(spec, parsed.argument)
    if parsed.kind in ("cifar10", "cifar100"):
        from narrows.data.cifar import load_cifar_bundle

        return load_cifar_bundle(spec, parsed.kind, parsed.argument, download=download)
    if parsed.kind == "imagenet":
        from narrows.data.imagenet import load_imagenet_bundle

        return load_imagenet_bundle(spec, parsed.argument, image_size=image_size)
    from narrows.data.imagenet import load_folder_bundle

    return load_folder_bundle(spec, parsed.argument, image_size=image_size)


def data_key(spec: str) -> str:
    """The data set's part of file and directory names: the spec when it is a plain word
    (``digits``), else its kind and 8 hex digits of the whole spec's hash
    (``cifar10-1a2b3c4d``), so that no two specs share it."""
    spec = spec.strip()
    if re.fullmatch(r"[A-Za-z0-9_.]+", spec):
        return spec.lower()
    kind = re.sub(r"[^A-Za-z0-9_.]+", "_", spec.partition(":")[0]).lower() or "data"
    return f"{kind}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
