"""Model-parameter randomisation: do the heatmaps change when the model's weights are destroyed?

The cascading randomisation check of Adebayo et al. (NeurIPS 2018, "Sanity checks for saliency
maps"): re-initialise the model from the top (output) down, one layer group more at each step,
and compare the heatmaps of the randomised model with those of the original. A method whose
maps barely change explains the input, not the model.

* **Layer groups.** By default the model's top-level children that hold parameters, in reverse
  order of their *first call* during a forward pass (found with hooks, so the definition order
  does not matter; children that are never called are left out). ``layers=[names]`` gives the
  groups explicitly (dotted module names, top first) and they are randomised in that order.
* **Re-initialisation.** Every sub-module with parameters of its own is reset by its own
  ``reset_parameters()`` (or ``_reset_parameters()``, as ``nn.MultiheadAttention``), under the
  global RNG forked and seeded from ``(seed, step)``; a module without such a method has its
  parameters' entries permuted with a seeded generator (listed in ``result.shuffled``). Running
  statistics (BatchNorm) are reset to mean 0, variance 1. All of it happens on a deep copy: the
  caller's model is never touched.
* **Comparisons**, per image: the Spearman rank correlation of the raw maps (ties get their
  average rank, as ``scipy.stats.spearmanr``) and the SSIM of the maps min-max normalised to
  ``[0, 1]`` (:func:`ssim`). They are summarised as mean ± standard deviation over images (sample
  std, ``ddof = 1``; images whose correlation is undefined, a constant map, are left out).
* **Noise floor.** A stochastic method (IBA draws noise) does not reproduce its own maps.
  ``repeats`` runs on the unmodified model are compared pairwise (mean over pairs per image), and
  the first run is the reference for every randomised step. Every call of ``attribute`` runs under
  its own seed (derived from ``seed`` and the call's index), so run-to-run and randomised
  comparisons both see independent noise, and the whole check is reproducible.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.attribution.layers import get_layer
from narrows.attribution.metrics.sensitivity import pearson
from narrows.errors import UserError

AttributeFn = Callable[[nn.Module, Tensor, Tensor], Any]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
FORMAT_KIND = "randomisation"  # saved files: "format": narrows.randomisation/1


# -- comparisons -----------------------------------------------------------------------------

def rank_average(values: Tensor) -> Tensor:
    """Ranks ``1…n`` along the last dimension (float64); tied values get their average rank."""
    flat = values.detach().reshape(-1, values.shape[-1]).cpu()
    ranks = torch.empty(flat.shape, dtype=torch.float64)
    for row, out in zip(flat, ranks, strict=True):
        ordered, order = row.sort(stable=True)
        _, group, counts = torch.unique_consecutive(ordered, return_inverse=True,
                                                    return_counts=True)
        last = counts.cumsum(0).double()  # rank of each tie group's last member
        out[order] = (last - (counts.double() - 1) / 2)[group]
    return ranks.reshape(values.shape)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Spearman ρ of ``N×H×W`` (or ``H×W``) maps; NaN where a map is constant."""
    a, b = _as_batch(a), _as_batch(b)
    if a.shape != b.shape:
        raise UserError(f"maps of different shapes: {tuple(a.shape)} and {tuple(b.shape)}",
                        "compare maps of the same images at one resolution")
    return pearson(rank_average(a.flatten(1)), rank_average(b.flatten(1)))


def minmax_normalise(maps: Tensor) -> Tensor:
    """Each ``H×W`` map scaled to ``[0, 1]`` (float64); a constant map becomes all zeros."""
    maps = _as_batch(maps).double()
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1.0), 0.0)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """A normalised 1-D Gaussian of ``size`` taps centred on the middle (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, *, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> Tensor:
    """Per-image mean SSIM (Wang et al. 2004) of ``N×H×W`` (or ``H×W``) maps.

    Local means, variances and the covariance are Gaussian-weighted (``window×window`` taps,
    ``sigma``), computed only where the window fits inside the image ("valid"), with
    ``C1 = (0.01·L)²`` and ``C2 = (0.03·L)²`` for ``L = data_range``. An image smaller than the
    window uses a window cut to the image's side. Inputs are not rescaled: normalise them first
    (:func:`minmax_normalise`).
    """
    a, b = _as_batch(a).double().cpu(), _as_batch(b).double().cpu()
    if a.shape != b.shape:
        raise UserError(f"maps of different shapes: {tuple(a.shape)} and {tuple(b.shape)}",
                        "compare maps of the same images at one resolution")
    _, h, w = a.shape
    gy = gaussian_window(min(window, h), sigma).view(1, 1, -1, 1)
    gx = gaussian_window(min(window, w), sigma).view(1, 1, 1, -1)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x.unsqueeze(1), gy), gx).squeeze(1)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return index.mean(dim=(1, 2))


def _as_batch(maps: Any) -> Tensor:
    maps = torch.as_tensor(maps).detach()
    if maps.ndim == 2:
        maps = maps.unsqueeze(0)
    if maps.ndim != 3:
        raise UserError(f"heatmaps must be N×H×W, got shape {tuple(maps.shape)}",
                        "return one 2-D map per image from the attribution method")
    return maps


def _mean_std(values: Tensor) -> tuple[float, float, int]:
    """Mean, sample std and count of the finite ``values``."""
    finite = values[torch.isfinite(values)]
    n = int(finite.numel())
    mean = float(finite.mean()) if n else float("nan")
    std = float(finite.std()) if n > 1 else float("nan")
    return mean, std, n


# -- randomising a model ---------------------------------------------------------------------

def _derive(seed: int, tag: int, index: int) -> int:
    """A distinct, reproducible seed for (``seed``, kind of draw, index)."""
    return (seed * 1_000_003 + tag * 10_007 + index) % 2**63


@contextlib.contextmanager
def _forked_seed(seed: int, devices: Sequence[torch.device]) -> Iterator[None]:
    """The global RNG (CPU and the CUDA ``devices``) forked and seeded; restored afterwards."""
    cuda = list(dict.fromkeys(d for d in devices if d.type == "cuda"))
    with torch.random.fork_rng(devices=cuda):
        # not torch.manual_seed: without CUDA in use it would queue a lazy CUDA seeding call
        torch.default_generator.manual_seed(seed)
        for device in cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def cascade_layers(model: nn.Module, example: Tensor) -> list[str]:
    """The default layer groups: top-level children with parameters, last called first.

    The order comes from one forward pass of ``example`` (in eval mode, without gradients;
    the training flags are restored afterwards). Children never called are left out.
    """
    holders = {name: child for name, child in model.named_children() if _holds_parameters(child)}
    called: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: object) -> None:
            if name not in called:
                called.append(name)
        return record

    handles = [child.register_forward_pre_hook(hook(name)) for name, child in holders.items()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    if not called:
        raise UserError("the model has no top-level sub-module with parameters to randomise",
                        "give the layers to re-initialise explicitly (layers=[...])")
    return called[::-1]


def check_layers(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """``layers`` as a list, after checking each names a sub-module that holds parameters."""
    names = list(layers)
    if not names:
        raise UserError("no layers to randomise", "give at least one layer name, top first")
    for name in names:
        if not _holds_parameters(get_layer(model, name)):
            raise UserError(f"layer '{name}' has no parameters to re-initialise",
                            "give layers that hold weights (e.g. fc, layer4)")
    return names


def reinitialise(module: nn.Module, seed: int) -> list[str]:
    """Re-initialise ``module`` in place, reproducibly from ``seed``.

    Each sub-module with parameters of its own calls its ``reset_parameters()`` (or
    ``_reset_parameters()``); one without has its parameters' entries permuted. Running
    statistics are reset. Returns the dotted names of the permuted parameters.
    """
    devices = [t.device for t in [*module.parameters(), *module.buffers()]]
    generator = torch.Generator().manual_seed(seed)
    shuffled: list[str] = []
    with _forked_seed(seed, devices), torch.no_grad():
        for name, sub in module.named_modules():
            own = list(sub.named_parameters(recurse=False))
            reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters",
                                                                      None)
            if own and callable(reset):
                reset()
            else:
                for pname, p in own:
                    order = torch.randperm(p.numel(), generator=generator).to(p.device)
                    p.copy_(p.reshape(-1)[order].view_as(p))
                    shuffled.append(f"{name}.{pname}" if name else pname)
            if callable(getattr(sub, "reset_running_stats", None)):
                sub.reset_running_stats()
    return shuffled


# -- the check -------------------------------------------------------------------------------

@dataclass
class RandomisationResult:
    """Comparisons of original and top-down randomised heatmaps.

    Step ``k`` (0-based) has ``layers[0..k]`` re-initialised. ``spearman`` and ``ssim`` are
    ``S×N`` (steps × images), each against the first original run; ``baseline_spearman`` and
    ``baseline_ssim`` (``N``) are the run-to-run values on the unmodified model, the mean over
    all pairs of the ``repeats`` runs (NaN when ``repeats = 1``). ``original`` (``R×N×H×W``) and
    ``randomised`` (``S×N×H×W``) are the maps themselves.
    """

    layers: list[str]
    spearman: Tensor
    ssim: Tensor
    baseline_spearman: Tensor
    baseline_ssim: Tensor
    original: Tensor
    randomised: Tensor
    repeats: int
    seed: int
    shuffled: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.spearman.shape[1])

    def to_rows(self) -> list[dict[str, Any]]:
        """The run-to-run row (step 0), then one row per randomised step, for CSV tables."""
        rows = []
        entries = [("run-to-run", "", self.baseline_spearman, self.baseline_ssim)]
        entries += [("randomised", name, self.spearman[k], self.ssim[k])
                    for k, name in enumerate(self.layers)]
        for step, (comparison, layer, rho, structural) in enumerate(entries):
            rho_mean, rho_std, rho_n = _mean_std(rho)
            ssim_mean, ssim_std, _ = _mean_std(structural)
            rows.append({
                "metric": "randomisation",
                "step": step,
                "comparison": comparison,
                "randomised_to": layer,
                "spearman_mean": rho_mean,
                "spearman_std": rho_std,
                "ssim_mean": ssim_mean,
                "ssim_std": ssim_std,
                "n_images": rho_n,
                "repeats": self.repeats,
                "seed": self.seed,
            })
        return rows

    def summary(self) -> str:
        """One line: agreement with the original maps once every layer is randomised, and the
        run-to-run floor."""
        rows = self.to_rows()
        last = rows[-1]
        floor = rows[0]["spearman_mean"]
        return (f"randomisation of {self.n_images} images down to '{last['randomised_to']}' "
                f"({len(self.layers)} steps): Spearman {last['spearman_mean']:.3f}, SSIM "
                f"{last['ssim_mean']:.3f}; run-to-run Spearman {floor:.3f}")

    def plot(self, ax: Any = None, label: str = "", color: str | None = None, *,
             axes: Any = None) -> Any:
        """Spearman ρ and SSIM against the randomised-down-to layer, with the run-to-run band.

        ``ax`` (or ``axes``): two matplotlib axes to draw into (to overlay methods); returns
        ``(fig, axes)``.
        """
        axes = ax if ax is not None else axes
        if axes is None:
            from narrows.plotting import pyplot

            fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.8), sharex=True)
        else:
            fig = axes[0].figure
        steps = list(range(len(self.layers)))
        rows = self.to_rows()
        for ax, key, title in ((axes[0], "spearman", "Spearman rank correlation"),
                               (axes[1], "ssim", "SSIM (min-max normalised maps)")):
            floor, spread = rows[0][f"{key}_mean"], rows[0][f"{key}_std"]
            line = ax.errorbar(steps, [r[f"{key}_mean"] for r in rows[1:]],
                               yerr=[r[f"{key}_std"] for r in rows[1:]], marker="o", capsize=3,
                               color=color, label=f"{label} (mean ± std over images)".strip())
            shade = line[0].get_color()
            if floor == floor:  # not NaN: repeats ≥ 2
                ax.axhline(floor, color=shade, linestyle="--", linewidth=1,
                           label=f"{label} run-to-run mean".strip())
                if spread == spread:
                    ax.axhspan(floor - spread, floor + spread, color=shade, alpha=0.12,
                               label=f"{label} run-to-run ± std (shaded)".strip())
            ax.set_title(title)
            ax.set_xticks(steps)
            ax.set_xticklabels(self.layers, rotation=45, ha="right")
            ax.set_xlabel("re-initialised from the top down to")
            ax.autoscale(enable=True, axis="y")  # earlier calls fixed the limits
            ax.relim()
            ax.autoscale_view()
            ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("agreement with the original maps")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        return fig, axes

    def save(self, path: str | Path) -> Path:
        """Write the result to one torch file (atomically), after the format header."""
        from narrows.attribution.result_files import save_torch_result
        from narrows.runs.results import provenance

        origin = provenance(seed=self.seed, options={"layers": list(self.layers),
                                                      "repeats": self.repeats, **self.meta})
        return save_torch_result(path, FORMAT_KIND,
                                 {f.name: getattr(self, f.name) for f in fields(self)}, origin)

    @classmethod
    def load(cls, path: str | Path) -> RandomisationResult:
        """Read a result written by :meth:`save` (files without a header load too)."""
        from narrows.attribution.result_files import load_torch_result
        from narrows.runs.files import reading

        fix = "delete it and run the randomisation check again"
        state = load_torch_result(path, FORMAT_KIND, "randomisation result file", fix)
        with reading(path, "randomisation result file", fix):
            return cls(**state)


def _maps(attribute: AttributeFn, model: nn.Module, inputs: Tensor, targets: Tensor, seed: int,
          batch_size: int, tick: Callable[[], None]) -> Tensor:
    """``attribute`` over ``inputs`` in chunks, under a forked RNG seeded with ``seed``."""
    out = []
    with _forked_seed(seed, [inputs.device]):
        for x, t in zip(inputs.split(batch_size), targets.split(batch_size), strict=True):
            maps = _as_batch(attribute(model, x, t)).float().cpu()
            if maps.shape[0] != x.shape[0]:
                raise UserError(f"the attribution method returned {maps.shape[0]} maps for "
                                f"{x.shape[0]} images", "return one map per image (N×H×W)")
            out.append(maps)
            tick()
    return torch.cat(out)


def _compare(reference: Tensor, maps: Tensor) -> tuple[Tensor, Tensor]:
    return spearman(reference, maps), ssim(minmax_normalise(reference), minmax_normalise(maps))


def cascading_randomisation(
    model: nn.Module,
    attribute: AttributeFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    repeats: int = 2,
    batch_size: int | None = None,
    progress: bool = False,
    description: str = "randomisation",
    normalizer: Any = None,
) -> RandomisationResult:
    """Cascading model-parameter randomisation of ``attribute`` on ``inputs`` and ``targets``.

    ``attribute(model, inputs, targets)`` returns ``N×H×W`` heatmaps (tensor or array) for a
    batch; it is called ``repeats + len(layers)`` times per chunk of ``batch_size`` images
    (default: all at once) on a deep copy of ``model``, which keeps its training mode. A
    stochastic method's draws depend on the chunking: the result is reproducible for the same
    ``seed`` and ``batch_size``. With ``normalizer`` (a :class:`~narrows.training.Normalizer`, callable or ``Subject``)
    ``inputs`` are [0, 1] images, normalised first; without it they are model inputs.
    ``layers`` (top first; None: :func:`cascade_layers`) are re-initialised one after the other;
    ``repeats`` runs on the unmodified model give the noise floor. ``description`` labels the
    progress bar. Returns a :class:`RandomisationResult`.
    """
    from narrows.attribution.inputs import as_normalizer, model_inputs

    inputs = model_inputs(inputs, as_normalizer(normalizer))
    if repeats < 1:
        raise UserError(f"repeats={repeats} must be ≥ 1", "use 2 or more to measure the "
                        "run-to-run noise floor")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise UserError(f"{inputs.shape[0]} inputs and {targets.shape[0]} targets",
                        "give one target per image, and at least one image")
    work = copy.deepcopy(model)
    groups = (check_layers(work, layers) if layers is not None
              else cascade_layers(work, inputs[:1]))
    chunk = batch_size or inputs.shape[0]
    from tqdm import tqdm

    bar = tqdm(total=(repeats + len(groups)) * -(-inputs.shape[0] // chunk), desc=description,
               disable=None if progress else True, leave=False)
    try:
        original = torch.stack([_maps(attribute, work, inputs, targets, _derive(seed, 1, r),
                                      chunk, bar.update) for r in range(repeats)])
        randomised, shuffled = [], []
        for step, name in enumerate(groups):
            shuffled += [f"{name}.{p}" for p in reinitialise(get_layer(work, name),
                                                              _derive(seed, 2, step))]
            randomised.append(_maps(attribute, work, inputs, targets,
                                    _derive(seed, 1, repeats + step), chunk, bar.update))
    finally:
        bar.close()
    maps = torch.stack(randomised)
    compared = [_compare(original[0], m) for m in maps]
    pairs = [_compare(original[i], original[j])
             for i in range(repeats) for j in range(i + 1, repeats)]
    nan = torch.full((inputs.shape[0],), torch.nan, dtype=torch.float64)
    return RandomisationResult(
        layers=groups,
        spearman=torch.stack([c[0] for c in compared]),
        ssim=torch.stack([c[1] for c in compared]),
        baseline_spearman=torch.stack([p[0] for p in pairs]).mean(0) if pairs else nan,
        baseline_ssim=torch.stack([p[1] for p in pairs]).mean(0) if pairs else nan.clone(),
        original=original,
        randomised=maps,
        repeats=repeats,
        seed=seed,
        shuffled=list(dict.fromkeys(shuffled)),
    )
