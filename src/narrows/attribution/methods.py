"""The method registry: every explainer behind one interface.

``get_method(name)(model, layer=None, **options).attribute(inputs, target)`` returns an
:class:`~narrows.attribution.heatmap.AttributionResult` for IBA (``iba``), the readout
bottleneck (``readout``) and each Captum baseline (``saliency``, ``gradcam``, ...; see
:func:`method_names`). Inputs are (N, C, H, W) images in [0, 1] as the data set serves them,
with ``normalizer=`` (or ``mean=``/``std=``) given when the method is built; without it they
are taken to be model inputs (normalised). ``target`` is one class per image (a tensor), one
class for all (an int) or ``None`` (the predicted class).

:class:`MethodSettings` holds the options of every method at once (as ``attribution
explain|evaluate|sanity`` take them) and builds any of them by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from narrows.attribution.baselines import ALIASES, BASELINES, available_methods, make_method
from narrows.attribution.heatmap import AttributionResult
from narrows.attribution.options import IBAOptions, LayerOption
from narrows.errors import UserError

__all__ = [
    "METHODS",
    "BaselineExplainer",
    "IBAMethod",
    "Method",
    "MethodSettings",
    "ReadoutMethod",
    "check_methods",
    "get_method",
    "method_names",
    "parse_names",
]

#: how the messages of :func:`check_methods` name the parameters (the CLI passes its flags)
PARAMETER_NAMES = {"layer": "layer", "cam_layer": "cam_layer", "method": "method",
                   "readout": "readout (a readout file)"}


class Method:
    """One explainer bound to ``model`` (at ``layer``, for methods that use one):
    ``attribute(inputs, target, ids=None)`` returns an :class:`AttributionResult`.

    ``normalizer`` (a :class:`~narrows.training.Normalizer`, a callable or a ``Subject``) or
    ``mean``/``std`` map [0, 1] images to model inputs (see :mod:`narrows.attribution.inputs`);
    without them ``inputs`` are model inputs. ``ids`` (the images' dataset indices) key each
    image's random draws on ``(seed, id)`` for methods that draw (IBA's noise; random and
    SmoothGrad given one image at a time), so a heatmap does not depend on the images
    explained before it. Further keyword ``options`` are the method's own settings.
    """

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, layer: str | None = None, *, normalizer: Any = None,
                 mean: Any = None, std: Any = None, **options: Any) -> None:
        from narrows.attribution.inputs import as_normalizer

        self.model, self.layer, self.options = model, layer, options
        self.normalizer = as_normalizer(normalizer, mean, std)

    def model_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` normalised when the method was given a normaliser, else unchanged."""
        from narrows.attribution.inputs import model_inputs

        return model_inputs(inputs, self.normalizer)

    def attribute(self, inputs: torch.Tensor, target: Any = None,
                  ids: list[int] | None = None) -> AttributionResult:
        """Heatmaps of ``inputs`` towards ``target`` (``ids``: the images' dataset indices)."""
        raise NotImplementedError


class IBAMethod(Method):
    """Per-sample IBA at ``layer`` (default: the stride-8 stage); needs ``statistics``."""

    name = "iba"

    def __init__(self, model: nn.Module, layer: str | None = None, *, statistics: Any,
                 beta: float = 10.0, steps: int = 10, batch_size: int = 10,
                 record_steps: bool = False, seed: int | None = None, normalizer: Any = None,
                 mean: Any = None, std: Any = None) -> None:
        super().__init__(model, layer, normalizer=normalizer, mean=mean, std=std)
        self.statistics, self.beta, self.steps = statistics, beta, steps
        self.batch_size, self.record_steps, self.seed = batch_size, record_steps, seed

    def attribute(self, inputs: torch.Tensor, target: Any = None,
                  ids: list[int] | None = None) -> AttributionResult:
        from narrows.attribution.per_sample import IBA

        iba = IBA(self.model, self.layer, self.statistics, beta=self.beta, steps=self.steps,
                  batch_size=self.batch_size, record_steps=self.record_steps,
                  seed=None if ids is None else self.seed)
        return iba.attribute(self.model_inputs(inputs), target, ids=ids)


_READOUTS: dict[tuple[str, int, int], Any] = {}


def load_readout_iba(path: str | Path, model: nn.Module) -> Any:
    """The :class:`ReadoutIBA` of the readout file ``path`` for ``model`` (loaded once)."""
    from narrows.attribution.readout import ReadoutIBA, load_readout

    file = Path(path)
    key = (str(file.resolve()), file.stat().st_mtime_ns if file.is_file() else 0, id(model))
    if key not in _READOUTS:
        _READOUTS.clear()
        _READOUTS[key] = ReadoutIBA(load_readout(path, model))
    return _READOUTS[key]


class ReadoutMethod(Method):
    """IBA in one forward pass through a trained readout (the file ``readout``)."""

    name = "readout"

    def __init__(self, model: nn.Module, layer: str | None = None, *,
                 readout: str | Path, normalizer: Any = None, mean: Any = None,
                 std: Any = None) -> None:
        super().__init__(model, layer, normalizer=normalizer, mean=mean, std=std)
        self.path = readout
        self.readout_iba = load_readout_iba(readout, model)

    def attribute(self, inputs: torch.Tensor, target: Any = None,
                  ids: list[int] | None = None) -> AttributionResult:
        readout = self.readout_iba
        inputs = self.model_inputs(inputs)
        readout.readout.to(inputs.device)
        expected = readout.readout.input_shape
        if expected and tuple(inputs.shape[1:]) != expected:
            raise UserError(f"the images are {tuple(inputs.shape[1:])} but {self.path} was "
                            f"trained on {expected}", "use the data the readout was trained on")
        return readout.attribute(inputs, target)


class BaselineExplainer(Method):
    """A baseline of :mod:`narrows.attribution.baselines` (``name``) as an explainer.

    ``layer`` is the layer of Grad-CAM and Guided Grad-CAM. ``seed`` (for methods that draw)
    is used as is, or with ``ids`` of one image derived from ``(seed, id)``.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, *, seed: int | None = None,
                 normalizer: Any = None, mean: Any = None, std: Any = None,
                 **options: Any) -> None:
        super().__init__(model, layer, normalizer=normalizer, mean=mean, std=std, **options)
        self.seed = seed
        make_method(self.name, model, layer=layer, **options)  # unknown options fail now

    def attribute(self, inputs: torch.Tensor, target: Any = None,
                  ids: list[int] | None = None) -> AttributionResult:
        from narrows.runtime import derive_seed

        options = dict(self.options)
        if self.seed is not None and "seed" in BASELINES[ALIASES.get(self.name, self.name)].defaults:
            options["seed"] = (derive_seed(self.seed, ids[0]) if ids is not None and len(ids) == 1
                               else self.seed)
        baseline = make_method(self.name, self.model, layer=self.layer, **options)
        maps = baseline.attribute(self.model_inputs(inputs), target)
        targets = target.tolist() if isinstance(target, torch.Tensor) else target
        return AttributionResult(heatmaps=maps.cpu().numpy(), targets=targets,
                                 meta=baseline.describe())


METHODS: dict[str, type[Method]] = {"iba": IBAMethod, "readout": ReadoutMethod}
for _name in [*available_methods(), *sorted(ALIASES)]:
    METHODS[_name] = type(f"{BASELINES[ALIASES.get(_name, _name)].__name__}Explainer",
                          (BaselineExplainer,), {"name": _name})


def method_names() -> list[str]:
    """Every registered method name: iba, readout, the baselines, then their aliases."""
    return list(METHODS)


def check_readout_given(methods: list[str], readout: str | None,
                        names: dict[str, str] | None = None) -> None:
    """Refuse the ``readout`` method among ``methods`` without a ``readout`` file (``names``:
    how the messages name ``method`` and ``readout``, e.g. as flags)."""
    names = names or {}
    if "readout" in methods and not readout:
        raise UserError(f"{names.get('method', 'method')} readout needs "
                        f"{names.get('readout', 'readout')}",
                        "train one with 'narrows attribution readout-train'")


def get_method(name: str) -> type[Method]:
    """The explainer class of method ``name``; unknown names raise a UserError."""
    if name not in METHODS:
        raise UserError(f"unknown attribution method '{name}'",
                        f"choose from {', '.join(method_names())}")
    return METHODS[name]


def parse_names(text: str, what: str = "methods",
                allowed: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Comma-separated ``text`` as a list without repeats; unknown or no names raise.
    ``what`` names the list in messages; ``allowed`` defaults to the registered methods."""
    allowed = method_names() if allowed is None else allowed
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"no {what} given", f"choose from {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise UserError(f"unknown {what[:-1]} '{name}'", f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


@dataclass
class MethodSettings:
    """The options of every method: IBA's (``layer``, ``beta``, ``steps``, ``iba_batch``),
    the readout file, Grad-CAM's ``cam_layer`` and the ``seed`` of per-image draws."""

    layer: str | None = LayerOption.layer
    beta: float = IBAOptions.beta
    steps: int = IBAOptions.steps
    iba_batch: int = IBAOptions.iba_batch
    readout: str | None = IBAOptions.readout
    cam_layer: str | None = IBAOptions.cam_layer
    seed: int = 0

    @classmethod
    def from_options(cls, options: Any = None, seed: int = 0, **overrides: Any
                     ) -> MethodSettings:
        """The settings of ``options`` (an :class:`~narrows.attribution.options.IBAOptions`, or
        a command's config: any object with some of these fields), then ``overrides``."""
        names = ("layer", "beta", "steps", "iba_batch", "readout", "cam_layer")
        values = {n: getattr(options, n) for n in names if hasattr(options, n)}
        return cls(**{**values, "seed": seed, **overrides})

    def build(self, name: str, model: nn.Module, statistics: Any = None,
              record_steps: bool = False, seeded: bool = True,
              normalizer: Any = None) -> Method:
        """Explainer ``name`` for ``model`` (IBA needs ``statistics``); ``seeded=False``
        leaves the baselines at their own default seed; ``normalizer`` as for :class:`Method`
        (None: it takes model inputs)."""
        cls = get_method(name)
        if cls is IBAMethod:
            return IBAMethod(model, self.layer, statistics=statistics, beta=self.beta,
                             steps=self.steps, batch_size=self.iba_batch,
                             record_steps=record_steps, seed=self.seed, normalizer=normalizer)
        if cls is ReadoutMethod:
            if not self.readout:
                raise UserError("method readout needs a readout file",
                                "train one with 'narrows attribution readout-train'")
            return ReadoutMethod(model, readout=self.readout, normalizer=normalizer)
        return cls(model, self.cam_layer, seed=self.seed if seeded else None,
                   normalizer=normalizer)


def check_methods(methods: list[str], model: nn.Module, settings: MethodSettings,
                  statistics: str | None = None, probe: torch.Tensor | None = None,
                  names: Mapping[str, str] | None = None) -> None:
    """Fail now, before any work, on what would fail later: a baseline that needs a missing
    extra or has no default layer on this model, a bad IBA layer, a statistics file
    (``statistics``) of another layer or (given a normalised ``probe`` image batch) of another
    feature shape. ``methods`` are names, ``settings`` their options; ``names`` says how
    messages name the parameters (default: their names). Returns None; raises a UserError."""
    from narrows.attribution.baselines import uses_layer
    from narrows.attribution.layers import default_layer, get_layer
    from narrows.attribution.statistics import FeatureStatistics

    n = {**PARAMETER_NAMES, **(names or {})}
    if settings.layer and not {"iba", "readout"} & set(methods):
        fix = (f"pass {n['cam_layer']} {settings.layer} to set Grad-CAM's layer"
               if any(uses_layer(m) for m in methods) else f"leave {n['layer']} out")
        raise UserError(f"{n['layer']} sets IBA's bottleneck, and {', '.join(methods)} "
                        f"{'does' if len(methods) == 1 else 'do'} not use it", fix)
    if settings.cam_layer and not any(uses_layer(m) for m in methods):
        raise UserError(f"{n['cam_layer']} sets the layer of gradcam and guided_gradcam, which "
                        f"are not among the methods ({', '.join(methods)})",
                        f"leave {n['cam_layer']} out")
    baselines = {*available_methods(), *ALIASES}
    for method in methods:
        if method in baselines:
            built = make_method(method, model, layer=settings.cam_layer)
            if uses_layer(method):
                get_layer(model, built.layer_name())  # a wrong name is one line, before any work
        elif method == "iba":
            layer = settings.layer or default_layer(model)
            get_layer(model, layer)
            if statistics:
                stats = FeatureStatistics.load(statistics)
                stats.check_model(model, statistics)
                if stats.layer and stats.layer != layer:
                    raise UserError(f"{statistics} holds statistics of layer '{stats.layer}',"
                                    f" not '{layer}'", f"pass {n['layer']} {stats.layer}, or "
                                    "estimate statistics of this layer with 'narrows "
                                    "attribution stats'")
                if probe is not None:
                    _check_shape(model, layer, probe, stats, statistics)
        elif method == "readout":
            if not settings.readout:
                raise UserError(f"{n['method']} readout needs {n['readout']}",
                                "train one with 'narrows attribution readout-train'")
            load_readout_iba(settings.readout, model)


def _check_shape(model: nn.Module, layer: str, probe: torch.Tensor, stats: Any,
                 source: str) -> None:
    """Raise unless ``stats`` has the feature shape ``layer`` gives on ``probe``."""
    from narrows.attribution.layers import run_to_layer

    with torch.no_grad():
        shape = tuple(run_to_layer(model.eval(), layer, probe).shape[1:])
    if stats.shape and tuple(stats.shape) != shape:
        raise UserError(f"{source} holds features shaped {tuple(stats.shape)}, but '{layer}' "
                        f"gives {shape} on these {tuple(probe.shape[-2:])} images",
                        "estimate statistics at this image size with 'narrows attribution "
                        "stats'")
