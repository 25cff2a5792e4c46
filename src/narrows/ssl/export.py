"""A pretrained backbone as a plain timm ViT file (``narrows ssl export``).

The file is a ``.safetensors`` state dict that ``timm.create_model(name, checkpoint_path=FILE,
...)`` loads strictly, with a narrows model card in its metadata so that every ``narrows
--checkpoint`` command rebuilds the model by itself (architecture, size, class tokens,
normalisation, data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from narrows.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Exported:
    """Where the backbone went, and how to build the model that loads it."""

    path: Path
    note: str
    timm_name: str
    timm_kwargs: dict[str, Any]
    class_tokens: str

    def summary(self) -> str:
        """One line: what was exported and how to load it."""
        return self.note


def load_pretrained(checkpoint: str | Path, *, which: Literal["teacher", "student"] = "teacher"
                    ) -> tuple[Any, dict[str, Any]]:
    """``(UDIModel, facts)``: the ``which`` network (teacher or student) of a ``narrows ssl
    train`` checkpoint or an official UDI/DINO one;
    ``facts`` has ``mean``, ``std``, ``data`` and ``img_size`` where the file records them."""
    from narrows.runs.files import read_torch_file
    from narrows.ssl.checkpoints import load_upstream

    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"no checkpoint {path}", "give the checkpoint.pt of a 'narrows ssl "
                        "train' run or an official UDI checkpoint.pth")
    try:
        state = read_torch_file(path, "pretraining checkpoint")
    except UserError:
        state = None  # not a narrows file (e.g. upstream's pickled Namespace): read it as one
    if isinstance(state, dict) and str(state.get("format", "")).startswith("narrows.ssl_"):
        return _narrows_model(state, which, path), {
            "mean": tuple(state["mean"]), "std": tuple(state["std"]), "data": state["data"],
            "img_size": state["options"]["img_size"]}
    model, _ = load_upstream(path, which=which)
    return model, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "data": None}


def _narrows_model(state: dict[str, Any], which: str, path: Path) -> Any:
    from narrows.models import load_state_dict_strict
    from narrows.ssl.model import pair_for

    student, teacher = pair_for(state["options"])
    model = teacher if which == "teacher" else student
    load_state_dict_strict(model, state[which], str(path))
    return model


def export_checkpoint(checkpoint: str | Path | None, output: str | Path | None = None, *,
                      which: Literal["teacher", "student"] = "teacher",
                      class_tokens: Literal["keep", "drop"] = "keep",
                      overwrite: bool = False) -> Exported:
    """Write the ``which`` backbone of ``checkpoint`` with both class tokens
    (``class_tokens="keep"``) or cls only (``"drop"``) to ``output`` (default: ``backbone-WHICH-TOKENS.safetensors`` beside the
    checkpoint), after loading it strictly into the timm model it names; returns
    :class:`Exported`. An existing ``output`` is refused unless ``overwrite``."""
    import timm

    from narrows.models import ModelCard, load_state_dict_strict, save_model
    from narrows.ssl.checkpoints import export_backbone, export_metadata

    if checkpoint is None:
        raise UserError("no checkpoint to export", "give the checkpoint (--checkpoint FILE)")
    source = Path(checkpoint)
    target = Path(output) if output else source.with_name(
        f"backbone-{which}-{'cls' if class_tokens == 'drop' else 'tokens'}.safetensors")
    if target.suffix != ".safetensors":
        raise UserError(f"the output {target} is not a .safetensors file",
                        "name the output FILE.safetensors")
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists", "pass --overwrite, or another --output")
    model, facts = load_pretrained(source, which=which)
    state, note = export_backbone(model, which=which, class_tokens=class_tokens)
    meta = export_metadata(model, class_tokens)
    kwargs = dict(meta["timm_kwargs"])
    vit = timm.create_model(meta["timm_name"], pretrained=False, **kwargs)
    load_state_dict_strict(vit, state, str(source))  # what timm will load, checked now
    kwargs.pop("num_classes", None)
    card = ModelCard(architecture=meta["timm_name"], num_classes=0, in_chans=3,
                     input_size=int(facts.get("img_size") or kwargs.get("img_size", 224)),
                     mean=facts["mean"], std=facts["std"], data_spec=facts["data"],
                     model_kwargs=kwargs)
    save_model(target, vit, card)
    return Exported(target, f"{which} backbone of {source}: {note}", meta["timm_name"], kwargs,
                    meta["class_tokens"])
