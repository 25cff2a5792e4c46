"""From capacity (nats per feature element) to heatmaps in bits per input pixel (spec §4)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from narrows.errors import UserError

FORMAT_KIND, FORMAT_VERSION = "attribution", 1  # meta.json's "format": narrows.attribution/1


def bits_per_cell(cap: torch.Tensor) -> torch.Tensor:
    """Capacity ``cap`` (nats) shaped S → bits per feature cell shaped (h, w).

    ``(C, h, w)``: NaN-safe sum over channels. ``(N, D)`` tokens: sum over D, then the leading
    ``N − g²`` tokens (class / register tokens) are dropped and the rest reshaped to g×g.
    """
    if cap.dim() == 3:
        cells = torch.nansum(cap, dim=0)
    elif cap.dim() == 2:
        per_token = torch.nansum(cap, dim=1)
        side = math.isqrt(per_token.shape[0])
        if side == 0:
            raise UserError("a token map with no tokens", "choose a layer with tokens")
        cells = per_token[per_token.shape[0] - side * side:].reshape(side, side)
    else:
        raise UserError(f"cannot make a heatmap from features shaped {tuple(cap.shape)}",
                        "use a layer with (C, h, w) maps or (N, D) token maps")
    return cells / math.log(2)


def heatmap_from_capacity(cap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Capacity ``cap`` (nats) shaped S → (H, W) = ``size`` bits per input pixel: cell bits ×
    (h·w)/(H·W), resized bilinearly, negatives clamped to 0."""
    cells = bits_per_cell(cap.detach().float())
    h, w = cells.shape
    height, width = size
    scaled = cells * (h * w) / (height * width)
    resized = F.interpolate(scaled[None, None], size=(height, width), mode="bilinear",
                            align_corners=False)[0, 0]
    return resized.clamp(min=0)


@dataclass
class AttributionResult:
    """Heatmaps (N, H, W), not normalised (comparable across images): IBA's in bits per input
    pixel; other methods say their ``units`` (and whether they are ``signed``) in ``meta``.

    ``capacity`` (N, *S) nats, ``step_heatmaps`` (N, T, H, W) and ``targets`` are optional;
    ``targets`` is None when the target was a loss closure.
    """

    heatmaps: np.ndarray
    targets: list[int] | None = None
    capacity: np.ndarray | None = None
    step_heatmaps: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write ``arrays.npz`` and ``meta.json`` into ``directory``."""
        from narrows.runs.files import atomic_write, atomic_write_json

        directory = Path(directory)
        arrays = {"heatmaps": self.heatmaps.astype(np.float32)}
        if self.capacity is not None:
            arrays["capacity"] = self.capacity.astype(np.float32)
        if self.step_heatmaps is not None:
            arrays["step_heatmaps"] = self.step_heatmaps.astype(np.float32)
        atomic_write(directory / "arrays.npz", lambda fh: np.savez_compressed(fh, **arrays))
        atomic_write_json(directory / "meta.json", {**self._header(), "targets": self.targets,
                                                    "meta": self.meta})
        return directory

    def _header(self) -> dict[str, Any]:
        from narrows.runs.results import header, provenance

        known = {k: self.meta[k] for k in ("method", "layer") if self.meta.get(k) is not None}
        origin = provenance(model=self.meta.get("model"), data=self.meta.get("data"),
                            seed=self.meta.get("seed"), options=known or None)
        return header(FORMAT_KIND, FORMAT_VERSION, origin)

    @classmethod
    def load(cls, directory: str | Path) -> AttributionResult:
        directory = Path(directory)
        missing = [f for f in ("arrays.npz", "meta.json") if not (directory / f).is_file()]
        if missing:
            raise UserError(f"{directory} is not a saved attribution result (no {missing[0]})",
                            "give a directory written by AttributionResult.save")
        from narrows.runs.files import read_json_file, read_npz, reading

        fix = "delete it and compute the heatmaps again"
        doc = read_json_file(directory / "meta.json", "attribution meta file", fix, kind=dict)
        from narrows.runs.results import check_header

        check_header(doc, FORMAT_KIND, FORMAT_VERSION, str(directory / "meta.json"))
        arrays = read_npz(directory / "arrays.npz", "attribution heatmaps file", fix,
                          required=("heatmaps",))
        with reading(directory / "meta.json", "attribution meta file", fix):
            meta = doc.get("meta", {})
            if not isinstance(meta, dict):
                raise ValueError("'meta' is not a JSON object")
        return cls(heatmaps=arrays["heatmaps"], targets=doc.get("targets"),
                   capacity=arrays.get("capacity"), step_heatmaps=arrays.get("step_heatmaps"),
                   meta=meta)

    def to_rows(self) -> list[dict[str, Any]]:
        """One record per heatmap: its target, method, units and value statistics."""
        rows = []
        for index, heat in enumerate(np.asarray(self.heatmaps, dtype=np.float64)):
            target = self.targets[index] if self.targets else None
            rows.append({"index": index, "target": None if target is None else int(target),
                         "method": str(self.meta.get("method", "IBA")), "units": self.units,
                         "min": float(np.nanmin(heat)), "max": float(np.nanmax(heat)),
                         "mean": float(np.nanmean(heat)), "sum": float(np.nansum(heat))})
        return rows

    def summary(self) -> str:
        """One line: how many heatmaps of which method, their size, units and value range."""
        heat = np.asarray(self.heatmaps, dtype=np.float64)
        n, size = int(heat.shape[0]), "×".join(str(v) for v in heat.shape[1:])
        span = (f"values {np.nanmin(heat):.3g} to {np.nanmax(heat):.3g}" if heat.size
                else "no values")
        return (f"{self.meta.get('method', 'IBA')}: {n} heatmap{'s' if n != 1 else ''} of "
                f"{size} in {self.units}, {span}")

    def headline(self) -> dict[str, float | int | str]:
        """The flat numbers of ``results.json``: ``method``, ``images``, ``units`` and the mean
        heatmap value (``mean``; left out when there are no finite values)."""
        heat = np.asarray(self.heatmaps, dtype=np.float64)
        found: dict[str, float | int | str] = {"method": str(self.meta.get("method", "IBA")),
                                                "images": int(heat.shape[0]),
                                                "units": self.units}
        finite = heat[np.isfinite(heat)]
        if finite.size:
            found["mean"] = float(finite.mean())
        return found

    @property
    def units(self) -> str:
        """What the heatmap values measure (``meta["units"]``; IBA: bits per input pixel)."""
        return str(self.meta.get("units", "bits per input pixel"))

    @property
    def signed(self) -> bool:
        """Whether values can be negative (``meta["signed"]``; IBA's bits cannot)."""
        return bool(self.meta.get("signed", False))

    def plot(self, index: int = 0, image: Any = None, ax: Any = None, *,
             class_names: Sequence[str] | None = None, subject: str | None = None):
        """Overlay heatmap ``index`` on a grey-scale ``image`` (CHW or HWC, display range [0, 1]).

        Non-negative maps (IBA's bits, Saliency, Grad-CAM): upper half of ``seismic`` with an
        alpha ramp from 0. Signed maps (``meta["signed"]``, e.g. Integrated Gradients):
        ``RdBu_r`` with limits ±max|value|, centred at 0. The colour bar carries the method's
        units; an all-zero map says so in the figure. The title names the method, the target
        (by ``class_names`` when given) and ``subject`` (e.g. the model). Returns ``(fig, ax)``.
        """
        from narrows.plotting import pyplot

        plt = pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(4.2, 3.6))
        else:
            fig = ax.figure
        heat = np.nan_to_num(np.asarray(self.heatmaps[index], dtype=np.float64))
        if image is not None:
            ax.imshow(_greyscale(image), cmap="gray", vmin=0, vmax=1)
        alpha = 0.7 if image is not None else None
        peak = float(np.abs(heat).max())
        if self.signed:
            limit = peak if peak > 0 else 1.0
            shown = ax.imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=alpha)
        else:
            vmax = float(heat.max()) if heat.max() > 0 else 1.0
            shown = ax.imshow(heat, cmap=_bits_colormap(), vmin=0, vmax=vmax, alpha=alpha)
        fig.colorbar(shown, ax=ax, label=_unit_label(self.units))
        if peak == 0:
            ax.text(0.5, 0.5, "all-zero map", transform=ax.transAxes, ha="center",
                    va="center", fontsize=9, color="black",
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.set_axis_off()
        target = self.targets[index] if self.targets else None
        title = str(self.meta.get("method", "IBA"))
        if target is not None:
            title += f" · {target_name(target, class_names)}"
        ax.set_title(title + (f"\n{subject}" if subject else ""), fontsize=9)
        return fig, ax


def target_name(target: int, class_names: Sequence[str] | None) -> str:
    """``class_names[target]`` when known, else ``class <target>``."""
    if class_names is not None and 0 <= int(target) < len(class_names):
        return str(class_names[int(target)])
    return f"class {target}"


def _unit_label(units: str) -> str:
    """A colour-bar label: IBA's "bits per input pixel" is written "bits / pixel"."""
    return "bits / pixel" if units == "bits per input pixel" else units


def _bits_colormap():
    from matplotlib.colors import ListedColormap

    from narrows.plotting import pyplot

    colours = pyplot().get_cmap("seismic")(np.linspace(0.5, 1.0, 256))
    colours[:, 3] = np.linspace(0.2, 1.0, 256)
    return ListedColormap(colours, name="seismic_upper_alpha")


def _greyscale(image: Any) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = array.astype(np.float64)
    if array.ndim == 4:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3:
        array = array.mean(axis=-1)
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:  # e.g. a normalised image: stretch to [0, 1] for display
        array = (array - low) / (high - low if high > low else 1.0)
    return array


def write_gif(path: str | Path, steps: np.ndarray, image: np.ndarray, size: int = 160,
              ms_per_frame: int = 250) -> Path:
    """An animated GIF of per-step heatmaps (T, H, W) blended over a grey ``image`` (C, H, W).

    Every frame uses one colour scale and one palette, so colours mean the same in every frame:
    0 to the peak of the final map in bits per pixel (the early steps, before the bottleneck
    has closed, exceed it and saturate; a scale set by them would draw the result blank). A
    strip under each frame gives the step and that scale.
    """
    from PIL import Image, ImageDraw

    from narrows.runs.files import atomic_write

    grey = _greyscale(image)
    cmap = _bits_colormap()
    steps = np.nan_to_num(np.asarray(steps, dtype=np.float64))
    final = float(steps[-1].max()) if steps.size else 0.0
    peak = final if final > 0 else (float(steps.max()) if steps.size else 0.0)
    vmax = peak if peak > 0 else 1.0
    strip = 36
    bar = cmap(np.linspace(0, 1, size - 16))[None, :, :3].repeat(6, axis=0)
    rgb_frames = []
    for step, heat in enumerate(steps, 1):
        rgba = cmap(np.clip(heat / vmax, 0, 1))
        alpha = rgba[..., 3:] * 0.7
        rgb = rgba[..., :3] * alpha + grey[..., None] * (1 - alpha)
        heat_img = Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size),
                                                                        Image.NEAREST)
        frame = Image.new("RGB", (size, size + strip), "white")
        frame.paste(heat_img, (0, 0))
        frame.paste(Image.fromarray((bar * 255).astype(np.uint8)), (8, size + 2))
        draw = ImageDraw.Draw(frame)
        scale = f"0 to {peak:.3g} bits/px" if peak > 0 else "all-zero map"
        draw.text((8, size + 10), f"step {step}/{len(steps)}", fill="black")
        draw.text((8, size + 22), scale, fill="black")
        rgb_frames.append(frame)
    # one adaptive palette for all frames (a palette per frame would shift the colours)
    sheet = Image.new("RGB", (size, (size + strip) * len(rgb_frames)))
    for k, frame in enumerate(rgb_frames):
        sheet.paste(frame, (0, k * (size + strip)))
    palette = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in rgb_frames]
    return atomic_write(path, lambda fh: frames[0].save(
        fh, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0))
