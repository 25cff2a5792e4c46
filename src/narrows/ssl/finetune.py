"""End-to-end fine-tuning of a pretrained ViT with a new classifier (spec §9.3, BEiT/iBOT
recipe): the backbone is exported to a plain timm ViT and trained by the core loop
(``narrows.training.fit``) with the recipe of :class:`~narrows.ssl.eval_options.FinetuneOptions`
(AdamW, layer decay 0.55, drop path 0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1,
RandAugment, random erasing, warm-up from 1e-6, cosine to 1e-6).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from narrows.errors import UserError
from narrows.runtime import Distributed

#: the file of a run directory the exported backbone is written to
BACKBONE_FILE = "backbone.safetensors"


def carded(path: str | Path) -> Any:
    """The narrows model card of the checkpoint at ``path``, or ``None`` when it has none or is
    not a file narrows reads directly (a pretraining checkpoint, an upstream release)."""
    from narrows.models import read_checkpoint

    try:
        return read_checkpoint(path).card
    except UserError:
        return None


def backbone_file(source: str | Path, target: Path, *, which: str, class_tokens: str,
                  say: Callable[[str], None] = print, card: Any = None) -> Path:
    """A file ``narrows train --checkpoint`` takes for ``source``: ``source`` itself when it
    has a model card (an ``ssl export`` backbone, a ``narrows train`` checkpoint; ``card``:
    that card when already read), else its ``which`` backbone exported with ``class_tokens``
    (``keep``/``drop``) to ``target``."""
    from narrows.ssl.export import export_checkpoint

    card = card if card is not None else carded(source)
    if card is not None:
        kind = ("a backbone" if card.num_classes == 0
                else f"a classifier of {card.num_classes} classes")
        say(f"fine-tuning {source} as it is ({kind}); --class-tokens and --which apply to "
            "pretraining checkpoints only")
        return Path(source)
    exported = export_checkpoint(source, target, which=which,  # type: ignore[arg-type]
                                 class_tokens=class_tokens,  # type: ignore[arg-type]
                                 overwrite=True)
    say(exported.summary())
    return exported.path


def check_source(source: str | Path, *, which: str = "teacher") -> str:
    """The layout of ``source`` (see :func:`narrows.ssl.checkpoints.detect_layout`: a file of
    no known layout is a :class:`UserError`), checked before anything is written; ``which``:
    the network of a pretraining checkpoint."""
    from narrows.ssl.checkpoints import detect_layout

    return detect_layout(Path(source), which=which)


def finetune(source: str | Path, data: str | None = None, options: Any = None, *,
             run: Any = None, device: Any = "cpu", dist: Distributed = Distributed(),
             seed: int = 0, model_kwargs: dict[str, Any] | None = None,
             image_size: int | None = None, progress: bool = False,
             say: Callable[[str], None] = print) -> Any:
    """Fine-tune the backbone in ``source`` on ``data`` (a spec; default: the data the backbone
    was pretrained on) with a new classifier, as ``narrows train`` would with ``options``
    (a :class:`~narrows.ssl.eval_options.FinetuneOptions`; default: the UDI README recipe).

    ``source`` is an ``ssl train`` checkpoint or an official UDI/DINO release (its ``which``
    network is exported, with ``class_tokens`` kept or dropped, to ``run/backbone.safetensors``)
    or a file with a model card used as it is. ``model_kwargs`` and ``image_size`` are
    ``narrows train``'s. With ``run`` (a :class:`narrows.runs.RunDir`, or a function opening
    one, called once the source and options are known to work) the run checkpoints,
    resumes and writes ``results.json``. Returns the :class:`narrows.training.TrainResult`.
    """
    import torch

    from narrows.ssl.eval_options import FinetuneOptions
    from narrows.training import TrainSettings, fit
    from narrows.training.setup import training_summary

    options = options if options is not None else FinetuneOptions()
    check_source(source, which=options.which)
    device = torch.device(device)
    build = {"model_kwargs": model_kwargs, "image_size": image_size, "options": options}
    card = carded(source)
    if card is not None:  # used as it is: built (and checked) before any file
        path = backbone_file(source, Path(source), which=options.which,
                             class_tokens=options.class_tokens, say=say, card=card)
        model, card, bundle, spec = _prepared(path, data, source, **build)
        run = run() if callable(run) else run
        if run is not None and dist.is_main:
            run.claim()
    else:
        run = run() if callable(run) else run
        with tempfile.TemporaryDirectory() as scratch:
            target = run.file(BACKBONE_FILE) if run is not None else Path(scratch) / BACKBONE_FILE
            if run is not None and dist.is_main:
                run.claim()  # the directory (and its config) before the export lands in it
            if dist.is_main and not (run is not None and run.exists(BACKBONE_FILE)):
                backbone_file(source, target, which=options.which,
                              class_tokens=options.class_tokens, say=say)
            if dist.enabled:
                import torch.distributed as tdist

                tdist.barrier()
            model, card, bundle, spec = _prepared(target, data, source, **build)
    settings = TrainSettings.from_options(options, seed=seed)
    say(f"fine-tuning {card.architecture} on {spec} ({len(bundle.train())} train / "
        f"{len(bundle.test())} test images), {settings.epochs} epochs, lr {settings.lr:g}, "
        f"layer decay {settings.layer_decay:g}")
    result = fit(model, bundle, settings, card=card, device=device, run=run, dist=dist,
                 progress=progress, log=say)
    if run is not None:
        run.write_json("results.json", training_summary(result, card, spec))
    return result


def _prepared(path: Path, data: str | None, source: str | Path, *, model_kwargs: Any,
              image_size: int | None, options: Any) -> tuple[Any, Any, Any, str]:
    """``(model, card, data bundle, data spec)`` for training the backbone file ``path`` (made
    from ``source``) on ``data`` (default: the data it records)."""
    from narrows.training.setup import checkpoint_data, prepare_training

    spec = data or checkpoint_data(str(path), default="")
    if not spec:
        raise UserError(f"{source} does not record the data it was trained on",
                        "give the data to fine-tune on (--data SPEC)")
    model, card, bundle = prepare_training(spec, checkpoint=str(path), model_kwargs=model_kwargs,
                                           image_size=image_size, drop_path=options.drop_path)
    return model, card, bundle, spec
