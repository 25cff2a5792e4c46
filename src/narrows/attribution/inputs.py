"""Attribution's one input convention: images as the data set serves them plus the normalisation.

Every explainer, :func:`~narrows.attribution.statistics.estimate_statistics` and the metrics
take ``normalizer=`` (a :class:`narrows.training.Normalizer`, any callable mapping [0, 1]
images to model inputs, or an object with ``mean`` and ``std`` such as a
:class:`narrows.models.Subject`), or ``mean=``/``std=``; they then normalise the [0, 1] images
first and do exactly what they do on model inputs. Without any of them (``None``) the inputs
are taken to be model inputs already.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from narrows.errors import UserError

Normalise = Callable[[torch.Tensor], torch.Tensor]


def as_normalizer(normalizer: Any = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> Normalise | None:
    """The function mapping [0, 1] images to model inputs, or None (inputs are model inputs).

    ``normalizer`` is a callable (e.g. a :class:`~narrows.training.Normalizer`) or an object
    with ``mean`` and ``std`` (e.g. a :class:`~narrows.models.Subject`); ``mean`` and ``std``
    (per channel) give the same without one. Giving both, or only one of mean and std, raises
    a :class:`~narrows.errors.UserError`.
    """
    if normalizer is not None and (mean is not None or std is not None):
        raise UserError("both normalizer and mean/std given", "pass one of them")
    if normalizer is None:
        if mean is None and std is None:
            return None
        if mean is None or std is None:
            raise UserError("mean given without std, or std without mean", "pass both")
        normalizer = _normalizer(mean, std)
    elif not callable(normalizer):
        if not (hasattr(normalizer, "mean") and hasattr(normalizer, "std")):
            raise UserError(f"normalizer is a {type(normalizer).__name__}, not a function of "
                            "images", "pass a narrows.training.Normalizer, a Subject, or mean "
                            "and std")
        normalizer = _normalizer(normalizer.mean, normalizer.std)
    return normalizer


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> Normalise:
    from narrows.training.batches import Normalizer

    return Normalizer(mean, std)


def model_inputs(images: torch.Tensor, normalizer: Normalise | None) -> torch.Tensor:
    """``normalizer(images)``, or ``images`` unchanged when ``normalizer`` is None."""
    return images if normalizer is None else normalizer(images)
