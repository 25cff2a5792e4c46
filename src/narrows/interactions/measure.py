"""Measure a model's interactions into a run directory: what ``narrows interactions run`` and
``compare`` do, as library functions.

:func:`settings_from_preset` resolves a preset and its overrides, :func:`check_settings` checks
them against the data before anything runs, :func:`measure_into` plans (saying the sample and
the cost), warns when the output ignores the patches, runs with per-image resume and saves, and
:func:`compare_models` does the same for several models on one set of images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from narrows.errors import UserError
from narrows.interactions.result import InteractionResult
from narrows.interactions.runner import InteractionSettings

if TYPE_CHECKING:
    from narrows.interactions.options import EstimateOptions

Say = Callable[..., None]


def settings_from_preset(preset: str | EstimateOptions | None = None, *, seed: int = 0,
                         extra_meta: dict | None = None, **overrides: Any) -> InteractionSettings:
    """The :class:`InteractionSettings` of ``preset`` (see :data:`PRESETS`) with ``overrides``;
    an override of ``None`` keeps the preset's value.

    ``preset`` may be an :class:`~narrows.interactions.options.EstimateOptions` (what ``narrows
    interactions run`` takes): its preset with its options over it (its ``split`` goes into the
    metadata), then ``overrides``; ``None`` is ``EstimateOptions()``, the command's defaults.
    ``extra_meta`` is added to the settings' metadata (with the preset's name)."""
    from narrows.interactions.options import EstimateOptions
    from narrows.interactions.presets import PRESETS

    if preset is None:
        preset = EstimateOptions()
    if isinstance(preset, EstimateOptions):
        options = preset
        given = {f.name: getattr(options, f.name) for f in dataclasses.fields(EstimateOptions)
                 if f.name not in ("preset", "split")}
        overrides = {**given, **overrides}
        extra_meta = {"split": options.split, **(extra_meta or {})}
        preset = options.preset
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'", f"use one of {', '.join(PRESETS)}")
    chosen = dict(PRESETS[preset])
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    chosen["ratios"] = tuple(chosen["ratios"])
    return InteractionSettings(**chosen, seed=seed,
                               extra_meta={"preset": preset, **(extra_meta or {})})


def check_settings(settings: InteractionSettings, dataset: Any) -> None:
    """What can be checked before a model runs or a file is written: ratios, counts, pairs on
    the grid, and the grid against the image size."""
    if len(dataset) == 0:
        raise UserError("the data set has no images to explain", "check --data and --split")
    image = dataset[0][0]
    settings.check_image(*image.shape[1:])


def measure_into(run: Any, model: Any, dataset: Any, num_classes: int,
                 settings: InteractionSettings, mean: Sequence[float], std: Sequence[float], *,
                 device: Any, dist: Any = None, progress: bool = True,
                 image_ids: list[int] | None = None, candidates: int | None = None,
                 say: Say = print, at_init: bool = False, class_names: Sequence[str] | None = None,
                 split: str = "train", command: str = "interactions run") -> InteractionResult:
    """Plan, run with per-image resume and save the interactions of ``model`` in ``run`` (a
    :class:`narrows.runs.RunDir`) on ``dataset`` (``num_classes`` classes, normalised with
    ``mean``/``std``), as ``settings`` say; returns the result. ``image_ids`` (with their
    ``candidates`` count): images chosen before, with another model. ``at_init``: the model is
    untrained (named as the likely cause of a degenerate result); ``class_names`` and ``split``
    only word the message about the chosen images. Says one warning when the output does not depend on the patches
    (then J is undefined and no curve is drawn). Besides the result's files, ``run`` gets the
    flat ``results.json`` (:func:`~narrows.runs.results.flat_summary`) naming ``command``."""
    from narrows.runtime import Distributed

    dist = dist or Distributed()
    p = _plan(model, dataset, num_classes, settings, mean, std, device, image_ids, candidates,
              at_init)
    if image_ids is None:
        say(f"images: {p.describe(settings.only_correct, class_names)} — the first of each "
            f"class in the {split} split")
        note = p.shrunk(settings.only_correct, at_init)
        if note:
            say(note)
    warned = dist.is_main and _warn_constant(model, dataset, p.image_ids, settings, mean, std,
                                             device, at_init, say)
    _say_cost(run, model, dataset, p, settings, mean, std, device, say)
    from narrows.interactions.runner import run as run_images

    result = run_images(model, dataset, p, settings, mean=mean, std=std, device=device,
                        images_dir=run.file("images"), dist=dist, progress=progress,
                        channels_last=_channels_last(device), at_init=at_init)
    if run.writer:
        from narrows.runs.results import flat_summary

        result.save(run.path)
        run.write_json("results.json", flat_summary(result, command=command))
        warning = result.warning()
        if warning and not warned:
            say(f"warning: no curve — {warning}")
    return result


def _plan(model, dataset, num_classes, settings, mean, std, device, image_ids, candidates,
          at_init):
    from narrows.interactions.runner import plan
    from narrows.training import Normalizer

    p = plan(model.to(device), dataset, num_classes, settings, Normalizer(mean, std), device,
             image_ids, candidates)
    if not p.image_ids:
        raise UserError(f"none of the {p.candidates} candidate images is classified correctly"
                        + (" (the model is at initialisation)" if at_init else ""),
                        "pass --no-only-correct, or use more --images")
    return p


def _warn_constant(model, dataset, image_ids, settings, mean, std, device, at_init,
                   say: Say) -> bool:
    """Say one warning when every image's output ignores the patches; whether it did."""
    from narrows.interactions.runner import (
        constant_output_cause,
        constant_reward,
        full_and_empty_values,
    )

    values = full_and_empty_values(model, dataset, image_ids, settings, mean=mean, std=std,
                                   device=device)
    if not constant_reward(values):
        return False
    say("warning: the model's output is the same with every patch kept and every patch "
        f"masked on all {len(image_ids)} images, so its interactions are likely all 0: "
        f"{constant_output_cause(model, at_init)}")
    return True


def _channels_last(device: Any) -> bool:
    return getattr(device, "type", str(device)) == "cpu"  # faster convolutions; same values


def _say_cost(run, model, dataset, p, settings, mean, std, device, say: Say) -> None:
    """The forward passes per image, the images already done and the time left."""
    from narrows.interactions.players import PlayerGrid
    from narrows.interactions.runner import measure_speed
    from narrows.runtime import format_duration
    from narrows.training import Normalizer

    images_dir = Path(run.file("images"))
    finished = sum((images_dir / f"{i:07d}.npz").is_file() for i in p.image_ids)
    image = dataset[p.image_ids[0]][0]
    speed = measure_speed(model, PlayerGrid(settings.grid, *image.shape[1:]),
                          Normalizer(mean, std)(image[None])[0], settings.batch_size, device,
                          _channels_last(device))
    todo = (len(p.image_ids) - finished) * p.forwards_per_image
    say(f"{p.forwards_per_image:,} forward passes each ({p.upstream_per_image:,} without the "
        f"exact shortcuts); {finished} of {len(p.image_ids)} images already done; {todo:,} to "
        f"go ≈ {format_duration(todo / speed)} at {speed:,.0f} forwards/s")


def model_entry(text: str) -> tuple[str, str | None, str | None]:
    """``LABEL=CHECKPOINT`` or ``LABEL=MODEL_NAME`` as ``(label, checkpoint, model_name)``, an
    entry of :func:`compare_models` (a weights file is told by its suffix)."""
    label, sep, target = text.partition("=")
    if not sep or not label or not target:
        raise UserError(f"model entry '{text}' is not LABEL=CHECKPOINT or LABEL=MODEL_NAME",
                        "e.g. trained=runs/train/resnet20_cifar-digits/best.pt")
    is_file = Path(target).suffix in (".pt", ".pth", ".th", ".tar", ".bin", ".safetensors")
    return (label, target, None) if is_file else (label, None, target)


def model_entries(texts: Sequence[str]) -> list[tuple[str, str | None, str | None]]:
    """The :func:`model_entry` of each of ``texts``: at least one, each with its own label, a
    safe directory name (each model's run is kept in ``run/LABEL``)."""
    from narrows.runs.run import safe_name

    if not texts:
        raise UserError("no models to compare", "list them under 'models:' in --config, as "
                        "LABEL=CHECKPOINT or LABEL=MODEL_NAME")
    entries = [model_entry(text) for text in texts]
    labels = [safe_name(entry[0], "model label") for entry in entries]
    if len(set(labels)) != len(labels):
        raise UserError("two models share a label", "give every model its own LABEL")
    return entries


def compare_models(entries: Sequence[tuple[str, str | None, str | None]], run: Any, *,
                   data: str | None, image_size: int | None,
                   settings_of: Callable[[dict], InteractionSettings], device: Any,
                   dist: Any = None, progress: bool = True, say: Say = print,
                   split: str = "train", first: Any = None) -> list[InteractionResult]:
    """The interactions of each of ``entries``, ``(label, checkpoint, model_name)``, on the
    images, pairs and contexts chosen once with the first model, each saved in ``run/LABEL``;
    returns the results in order. ``data`` (a data spec), ``image_size`` and ``split`` default
    to the first checkpoint's card and the training split; ``settings_of(meta)``
    makes a model's settings from its metadata; ``first`` is the first model's loaded subject
    when the caller has it already. ``run`` gets the overlay ``compare.png``, the labels'
    ``comparison.json`` and, last, the flat ``results.json`` of the
    :class:`~narrows.interactions.result.InteractionComparison` (command ``interactions
    compare``; each model's run has its own)."""
    from narrows.interactions.runner import select
    from narrows.models.subject import load_subject
    from narrows.runs import RunDir
    from narrows.runtime import Distributed
    from narrows.training import Normalizer

    dist = dist or Distributed()
    results: list[InteractionResult] = []
    image_ids: list[int] | None = None
    candidates = None
    for k, (label, checkpoint, model) in enumerate(entries):
        subject = first if k == 0 and first is not None else load_subject(
            checkpoint, model, data, image_size)
        info = subject.bundle.info
        data = data or info.spec
        settings = settings_of({"model": subject.name, "checkpoint": checkpoint, "data": data,
                                "label": label, "image_size": info.image_size,
                                "class_names": list(info.class_names)})
        dataset = subject.bundle.split(split)
        say(f"\n== {label}: {subject.name}")
        chosen_here = image_ids is None
        if chosen_here:
            image_ids, _, candidates = select(subject.model.to(device), dataset, info.num_classes,
                                              settings, Normalizer(subject.mean, subject.std),
                                              device)
            if not image_ids:
                raise UserError(f"none of the {candidates} candidate images is classified "
                                f"correctly by {label} (the images are chosen with the first "
                                "model)", "pass --no-only-correct, list another model first, "
                                "or use more --images")
        options = {"checkpoint": checkpoint, "model": model, "images": list(image_ids),
                   "settings": repr(settings)}
        sub = (RunDir.open(run.path / label, "interactions run", {"label": label}, options)
               if dist.is_main else RunDir(run.path / label, writer=False))
        results.append(measure_into(
            sub, subject.model, dataset, info.num_classes, settings, subject.mean, subject.std,
            device=device, dist=dist, progress=progress,
            image_ids=None if chosen_here else image_ids,
            candidates=None if chosen_here else candidates, say=say,
            at_init=checkpoint is None, class_names=list(info.class_names), split=split))
    if dist.is_main and getattr(run, "writer", True):
        from narrows.interactions.result import InteractionComparison
        from narrows.runs.results import flat_summary

        comparison = InteractionComparison(
            {entry[0]: result for entry, result in zip(entries, results, strict=True)})
        comparison.save_index(run.path)  # InteractionComparison.load(run.path) reads it all
        fig, _ = comparison.plot()
        run.save_figure("compare.png", fig)
        # last: a run directory with results.json is a finished one (narrows sweep)
        run.write_json("results.json", flat_summary(comparison, command="interactions compare"))
    return results
