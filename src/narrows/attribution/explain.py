"""Explain test images with one method, one image at a time, each saved as it is done.

:func:`explain_images` is ``narrows attribution explain`` as a function. Into a
:class:`~narrows.runs.RunDir` it writes ``items/<index>/`` (each image's
:class:`~narrows.attribution.heatmap.AttributionResult`), ``heatmap_<index>.png``, with
``gif`` ``iba_<index>.gif``, then ``heatmaps.npz``, ``result/`` (all images) and the flat
``results.json`` (:func:`~narrows.runs.results.flat_summary`). Images already done are
skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from narrows.attribution.heatmap import AttributionResult
from narrows.attribution.methods import MethodSettings

if TYPE_CHECKING:
    from torch import nn

    from narrows.runs import RunDir

__all__ = ["explain_images"]


def explain_images(model: nn.Module, dataset: Any, indices: list[int], method: str,
                   out: RunDir, *, normalizer: Any, settings: MethodSettings | None = None,
                   statistics: Any = None, gif: bool | None = None, device: Any = None,
                   progress: bool = True, class_names: Any = None, name: str = "model",
                   data: str = "", log: Any = print, options: Any = None,
                   command: str = "attribution explain") -> AttributionResult:
    """Heatmaps of ``method`` for the ``indices`` images of ``dataset`` (towards their labels),
    saved into ``out`` image by image (``gif``: IBA's steps as animated GIFs too).

    ``normalizer`` maps the data set's images to model inputs; ``settings`` holds the method's
    options; IBA needs ``statistics``. ``name`` and ``data`` describe the model and data in the
    results and titles; ``class_names`` name the targets; ``log`` prints the cost line.
    Returns the result of all images.
    ``options`` (an :class:`~narrows.attribution.options.ExplainOptions`, or the command's
    config) gives ``gif`` if None and, without ``settings``, the methods' settings; the rest
    default as ``narrows attribution explain`` does. ``command`` is what ``results.json``
    names (the run's command).
    """
    import numpy as np

    from narrows.attribution.evaluation import progress_bar
    from narrows.attribution.heatmap import target_name, write_gif
    from narrows.attribution.images import describe_images, image_batch
    from narrows.attribution.options import ExplainOptions, pick
    from narrows.data import dataset_labels
    from narrows.plotting import pyplot
    from narrows.runs.files import atomic_savefig, atomic_write

    gif = pick(options, ExplainOptions, gif=gif)["gif"]
    settings = settings or MethodSettings.from_options(options, getattr(options, "seed", 0))
    all_labels = dataset_labels(dataset)
    labels = [all_labels[i] for i in indices]
    todo = [i for i in indices if not (out.file(f"heatmap_{i}.png").is_file()
                                       and (out.file("items") / f"{i}" / "arrays.npz").is_file()
                                       and (not gif or out.file(f"iba_{i}.gif").is_file()))]
    steps, batch = settings.steps, settings.iba_batch
    per_image = f"{steps} steps × {batch} noise samples" if method == "iba" else "1 attribution"
    log(f"{name}: {method} on {describe_images(indices, labels, class_names)}; "
        f"{len(indices) - len(todo)} already done, {per_image} each"
        + (f" = {len(todo) * steps * batch:,} suffix forwards to go" if method == "iba" else ""))
    plt = pyplot()
    explainer = settings.build(method, model, statistics, record_steps=gif)
    for i in progress_bar(todo, progress, method):
        image, label = image_batch(dataset, [i])
        result = explainer.attribute(normalizer(image.to(device)), label.to(device), ids=[i])
        result.meta = {**result.meta, "model": name, "data": data, "index": i}
        result.save(out.file("items") / f"{i}")
        fig, _ = result.plot(0, image[0], class_names=class_names,
                             subject=f"{name} · test image {i}")
        atomic_savefig(out.file(f"heatmap_{i}.png"), fig, dpi=120, bbox_inches="tight")
        plt.close(fig)
        if gif:
            write_gif(out.file(f"iba_{i}.gif"), result.step_heatmaps[0], image[0].numpy())
    results = [AttributionResult.load(out.file("items") / f"{i}") for i in indices]
    heatmaps = np.stack([r.heatmaps[0] for r in results])
    targets = [r.targets[0] if r.targets else -1 for r in results]
    names = [target_name(t, class_names) if t >= 0 else "" for t in targets]
    atomic_write(out.file("heatmaps.npz"), lambda fh: np.savez_compressed(
        fh, heatmaps=heatmaps.astype(np.float32), indices=np.array(indices),
        targets=np.array(targets), target_names=np.array(names)))
    meta = {k: v for k, v in results[0].meta.items()
            if not k.startswith("seconds") and k != "index"}
    combined = AttributionResult(heatmaps=heatmaps, targets=targets,
                                 meta={**meta, "indices": indices, "target_names": names,
                                       "class_names": list(class_names)})
    combined.save(out.file("result"))
    from narrows.runs.results import flat_summary

    out.write_json("results.json", flat_summary(combined, command=command))
    return combined
