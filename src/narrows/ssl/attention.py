"""Last-block attention of the class tokens over the patches (DINO's and UDI's attention maps).

For each query token (``cls``, and ``cls+`` on a 2-token ViT) and each head, the map is the
row of the last block's softmax attention restricted to the patch keys, laid out on the patch
grid: ``[B, tokens, heads, H/P, W/P]``. The class (and register) keys are left out, so a map
sums to one minus the attention the token pays to the prefix tokens. The attention is computed
explicitly (:func:`narrows.models.vit_tokens.last_attention`), also when timm fuses it.

:func:`threshold_masks` is DINO's rule: per map, the smallest set of patches, largest first,
that holds at least ``threshold`` of the map's mass.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from narrows.errors import UserError

FORMAT_KIND, FORMAT_VERSION = "ssl.attention", 1
JSON_NAME, MAPS_NAME = "attention.json", "maps.pt"
TOKEN_ROWS = {"cls": 0, "cls+": 1}


def query_rows(vit: nn.Module, tokens: Sequence[str]) -> list[int]:
    """The query row of each of ``tokens`` in ``vit``'s sequence (``cls`` 0, ``cls+`` 1); a
    :class:`UserError` for a token the ViT does not have."""
    from narrows.models.features import class_tokens

    have = class_tokens(vit)
    rows = []
    for token in tokens:
        if token not in TOKEN_ROWS:
            raise UserError(f"{token!r} is not a class token", "give cls, cls+ or both")
        if TOKEN_ROWS[token] >= have:
            why = "it has no class token" if have == 0 else "only a 2-token (UDI) ViT has cls+"
            raise UserError(f"this ViT has no {token} token to draw attention of ({why})",
                            "draw --tokens cls" if have else "use a ViT with a class token")
        rows.append(TOKEN_ROWS[token])
    return rows


def patch_size_of(vit: nn.Module) -> tuple[int, int]:
    """The patch size (P_h, P_w) of the timm ViT ``vit``."""
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise UserError(f"{type(vit).__name__} has no patch embedding",
                        "use a timm VisionTransformer")
    return (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))


@torch.no_grad()
def attention_maps(vit: nn.Module, images: Tensor, *, mean: Sequence[float],
                   std: Sequence[float], tokens: Sequence[str] = ("cls", "cls+")) -> Tensor:
    """Attention of the class ``tokens`` of ``vit`` (in eval mode) over the patches of
    ``images`` [B, 3, H, W] in [0, 1] (normalised here with ``mean`` and ``std``):
    ``[B, len(tokens), heads, H/P, W/P]`` float32; class and register keys excluded."""
    from narrows.models.features import patch_grid
    from narrows.models.vit_tokens import last_attention

    rows = query_rows(vit, tokens)
    gh, gw = patch_grid(vit, (images.shape[-2], images.shape[-1]))
    device = next(vit.parameters()).device
    from narrows.training.batches import Normalizer

    x = images.to(device=device, dtype=torch.float32)
    was_training = vit.training
    vit.eval()
    try:
        attn = last_attention(vit, Normalizer(tuple(mean), tuple(std))(x))
    finally:
        vit.train(was_training)
    prefix = int(vit.num_prefix_tokens)
    picked = attn[:, :, rows, prefix:]  # [B, heads, tokens, N]
    b, h = picked.shape[:2]
    return picked.permute(0, 2, 1, 3).reshape(b, len(rows), h, gh, gw).float()


def threshold_masks(maps: Tensor, threshold: float) -> Tensor:
    """Boolean masks of ``maps`` [..., gh, gw]: per map, the smallest set of patches, largest
    first (equal values: the later patch first), holding at least ``threshold`` (in (0, 1]) of
    the map's total (DINO: sort ascending, keep where cumsum / sum > 1 - ``threshold``)."""
    if not 0 < threshold <= 1:
        raise UserError(f"attention threshold {threshold} is outside (0, 1]", "pass e.g. 0.6")
    flat = maps.flatten(-2).double()
    values, order = flat.sort(dim=-1, stable=True)
    total = values.sum(-1, keepdim=True)
    keep = values.cumsum(-1) / total.clamp_min(torch.finfo(torch.float64).tiny) > 1 - threshold
    keep &= total > 0
    masks = torch.zeros_like(keep)
    masks.scatter_(-1, order, keep)
    return masks.reshape(maps.shape)


def map_entropy(maps: Tensor) -> Tensor:
    """Entropy (nats) of each of ``maps`` [..., gh, gw] renormalised to sum 1 over its patches."""
    p = maps.flatten(-2).double()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def read_images(files: Sequence[str | Path], size: int) -> tuple[Tensor, list[str]]:
    """The image ``files`` as ``[n, 3, size, size]`` floats in [0, 1] (each resized to a
    square of side ``size``) and their names (file stems)."""
    import numpy as np

    from narrows.data.imagenet import open_rgb

    pictures, names = [], []
    for file in files:
        if not Path(file).is_file():
            raise UserError(f"no image file {file}", "check the --image paths")
        image = open_rgb(str(file)).resize((size, size), resample=3)  # bicubic
        array = np.asarray(image, dtype=np.uint8).copy()
        pictures.append(torch.from_numpy(array).permute(2, 0, 1).float() / 255)
        names.append(Path(file).stem)
    if not pictures:
        raise UserError("no image files to draw", "pass --image FILE... or --images N")
    return torch.stack(pictures), names


def _dataset_images(data: Any, count: int) -> tuple[Tensor, list[str], str]:
    from narrows.data.selection import select_images

    test = data.test()
    picked = select_images(test, count, seed=0, how="spread")
    pictures, names = [], []
    class_names = list(getattr(data.info, "class_names", ()))
    for index in picked:
        image, label = test[index]
        pictures.append(torch.as_tensor(image).float())
        label = int(label)
        name = class_names[label] if label < len(class_names) else str(label)
        names.append(f"{name}-{index}")
    if not pictures:
        raise UserError(f"the test split of {data.info.spec} has no images", "use other data")
    return torch.stack(pictures), names, data.info.spec


def visualise_attention(backbone: Any, images: Any, options: Any, *,
                        device: torch.device | str = "cpu", batch_size: int = 16) -> AttentionResult:
    """Attention maps of ``backbone`` (an ``EvalBackbone``: its ViT, mean, std, image size,
    id and layout) on ``images``: a ``DataBundle`` (``options.images`` test images spread over
    the classes), a data spec, or a list of image files (resized to the backbone's image size).
    ``options`` (``AttentionOptions``) chooses the tokens and the mask ``threshold``; its
    ``image`` files, when given, are drawn instead of ``images``. Maps are computed
    ``batch_size`` images at a time."""
    from narrows.runs.results import provenance

    started = time.perf_counter()
    vit = backbone.vit
    tokens = list(getattr(options, "tokens", ("cls", "cls+")))
    query_rows(vit, tokens)
    files = list(getattr(options, "image", []) or [])
    if isinstance(images, (list, tuple)):
        files = files or [str(f) for f in images]
    if files:
        pictures, names = read_images(files, int(backbone.input_size))
        data = "files"
    else:
        if images is None:
            raise UserError("no images to draw attention on", "pass --data SPEC or --image FILE")
        from narrows.ssl.backbones import eval_data

        pictures, names, data = _dataset_images(eval_data(backbone, images), int(options.images))
    vit.to(device)
    maps = torch.cat([attention_maps(vit, pictures[i:i + batch_size], mean=backbone.mean,
                                     std=backbone.std, tokens=tokens).cpu()
                      for i in range(0, pictures.shape[0], batch_size)])
    seconds = time.perf_counter() - started
    opts = asdict(options) if is_dataclass(options) else dict(vars(options))
    return AttentionResult(
        model=str(backbone.id), layout=str(backbone.layout), tokens=tokens,
        patch_size=patch_size_of(vit)[0], image_size=int(pictures.shape[-1]), names=names,
        images=(pictures * 255).round().clamp(0, 255).to(torch.uint8),
        maps=maps.to(torch.float16), threshold=getattr(options, "threshold", None), data=data,
        provenance=provenance(model=str(backbone.id), data=data, options=opts,
                              compute={"device": str(device), "seconds": seconds,
                                       "layout": str(backbone.layout)}))


@dataclass
class AttentionResult:
    """Attention maps of the class tokens on a few images (kind ``ssl.attention``):
    ``images`` [n, 3, H, W] uint8, ``maps`` [n, tokens, heads, H/P, W/P] float16 (patch keys
    only), ``threshold`` the mask share drawn (``None``: no masks)."""

    model: str
    layout: str
    tokens: list[str]
    patch_size: int
    image_size: int
    names: list[str]
    images: Tensor
    maps: Tensor
    threshold: float | None = None
    data: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def heads(self) -> int:
        return int(self.maps.shape[2])

    def masks(self) -> Tensor | None:
        """The :func:`threshold_masks` of the maps, or ``None`` without a threshold."""
        if self.threshold is None:
            return None
        return threshold_masks(self.maps.float(), self.threshold)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per (image, token, head): entropy (nats), largest weight, patch mass of the
        map, and the share of patches in its threshold mask (``None`` without a threshold)."""
        maps = self.maps.float()
        entropy, peak = map_entropy(maps), maps.flatten(-2).max(-1).values
        mass = maps.flatten(-2).sum(-1)
        masks = self.masks()
        area = masks.flatten(-2).double().mean(-1) if masks is not None else None
        rows = []
        for i, name in enumerate(self.names):
            for t, token in enumerate(self.tokens):
                for h in range(self.heads):
                    rows.append({"model": self.model, "image": i, "name": name, "token": token,
                                 "head": h, "entropy": float(entropy[i, t, h]),
                                 "max": float(peak[i, t, h]), "patch_mass": float(mass[i, t, h]),
                                 "mask_area": None if area is None else float(area[i, t, h])})
        return rows

    def summary(self) -> str:
        """One line: tokens, heads, grid, images and the mean entropy per token."""
        entropy = map_entropy(self.maps.float())
        per_token = ", ".join(f"{token} {float(entropy[:, t].mean()):.2f}"
                              for t, token in enumerate(self.tokens))
        gh, gw = self.maps.shape[-2:]
        return (f"attention of {', '.join(self.tokens)} ({self.heads} heads, {gh}x{gw} patches) "
                f"on {len(self.names)} images, {self.model} ({self.layout}): mean entropy "
                f"{per_token} nats (uniform {math.log(gh * gw):.2f})")

    def headline(self) -> dict[str, float]:
        """Mean attention entropy (nats) per query token, ``"<token>/entropy"`` (results.json)."""
        entropy = map_entropy(self.maps.float())
        return {f"{token}/entropy": float(entropy[:, t].mean())
                for t, token in enumerate(self.tokens)}

    # -- files -----------------------------------------------------------------------------
    def _paths(self, path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix == ".json":
            return path, path.with_name(f"{path.stem}-{MAPS_NAME}")
        return path / JSON_NAME, path / MAPS_NAME

    def save(self, path: str | Path) -> Path:
        """Write ``path``/attention.json and maps.pt beside it (``path`` a directory, or a
        .json file whose maps go to ``<stem>-maps.pt``); returns the JSON file."""
        from narrows.runs.files import atomic_torch_save, atomic_write_json
        from narrows.runs.results import header

        file, maps_file = self._paths(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(maps_file, {"images": self.images.contiguous(),
                                      "maps": self.maps.contiguous()})
        document = {**header(FORMAT_KIND, FORMAT_VERSION, self.provenance),
                    "model": self.model, "layout": self.layout, "tokens": list(self.tokens),
                    "patch_size": self.patch_size, "image_size": self.image_size,
                    "names": list(self.names), "threshold": self.threshold, "data": self.data,
                    "maps_file": maps_file.name, "maps_shape": list(self.maps.shape),
                    "summary": self.summary()}
        return atomic_write_json(file, document)

    @classmethod
    def load(cls, path: str | Path) -> AttentionResult:
        """The result :meth:`save` wrote to ``path`` (directory or .json file)."""
        from narrows.runs.files import read_json_file, read_torch_file
        from narrows.runs.results import check_header

        file = Path(path)
        if file.is_dir():
            file = file / JSON_NAME
        fix = "run 'narrows ssl attention' again"
        document = read_json_file(file, "attention result", fix, kind=dict,
                                  required_keys=("model", "tokens", "names", "maps_file"))
        check_header(document, FORMAT_KIND, FORMAT_VERSION, str(file))
        tensors = read_torch_file(file.parent / document["maps_file"], "attention maps file", fix)
        return cls(model=document["model"], layout=document.get("layout", ""),
                   tokens=list(document["tokens"]), patch_size=int(document["patch_size"]),
                   image_size=int(document["image_size"]), names=list(document["names"]),
                   images=tensors["images"], maps=tensors["maps"],
                   threshold=document.get("threshold"), data=document.get("data", ""),
                   provenance=dict(document.get("provenance", {})))

    # -- figures ---------------------------------------------------------------------------
    def _upsampled(self, i: int) -> Tensor:
        """Maps of image ``i`` [tokens, heads, H, W], each patch repeated P × P (nearest)."""
        p = self.patch_size
        return self.maps[i].float().repeat_interleave(p, -2).repeat_interleave(p, -1)

    def figure(self, i: int) -> Any:
        """Figure of image ``i``: one row per token: the image, each head's map and the mean
        over heads (patches drawn as blocks), with threshold-mask contours when set."""
        from narrows.plotting import pyplot

        plt = pyplot()
        maps = self._upsampled(i)
        masks = (None if self.threshold is None  # this image's masks only
                 else threshold_masks(self.maps[i].float(), self.threshold))
        p = self.patch_size
        cols = self.heads + 2
        fig, axes = plt.subplots(len(self.tokens), cols, figsize=(1.6 * cols,
                                                                   1.7 * len(self.tokens)),
                                 squeeze=False)
        picture = self.images[i].permute(1, 2, 0).numpy()
        for t, token in enumerate(self.tokens):
            row = axes[t]
            row[0].imshow(picture)
            row[0].set_ylabel(token)
            row[0].set_title(self.names[i] if t == 0 else "", fontsize=8)
            for h in range(self.heads + 1):
                ax = row[h + 1]
                shown = maps[t, h] if h < self.heads else maps[t].mean(0)
                ax.imshow(shown.numpy(), cmap="viridis", interpolation="nearest")
                if masks is not None and h < self.heads:
                    mask = masks[t, h].float().repeat_interleave(p, 0).repeat_interleave(p, 1)
                    if 0 < float(mask.mean()) < 1:
                        ax.contour(mask.numpy(), levels=[0.5], colors="white", linewidths=0.8)
                if t == 0:
                    ax.set_title(f"head {h + 1}" if h < self.heads else "mean", fontsize=8)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(f"{self.model}: last-block attention", fontsize=9)
        fig.tight_layout()
        return fig

    def montage(self) -> Any:
        """An RGB array [rows·H, cols·W, 3]: per image, the image then each token's mean map
        over heads (viridis, scaled per map), separated by white lines."""
        import numpy as np
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        size, gap = self.image_size, 2
        cols = 1 + len(self.tokens)
        out = np.ones((len(self.names) * (size + gap), cols * (size + gap), 3))
        for i in range(len(self.names)):
            top = i * (size + gap)
            out[top:top + size, :size] = self.images[i].permute(1, 2, 0).numpy() / 255
            maps = self._upsampled(i).mean(1).numpy()
            for t in range(len(self.tokens)):
                m = maps[t]
                m = (m - m.min()) / (m.max() - m.min() + 1e-12)
                left = (t + 1) * (size + gap)
                out[top:top + size, left:left + size] = cmap(m)[..., :3]
        return out

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """The grid: one row per image with the image and each token's mean map over heads,
        on a new axes or ``ax``. Returns ``(fig, ax)``."""
        from narrows.plotting import pyplot

        if ax is None:
            rows = max(len(self.names), 1)
            fig, ax = pyplot().subplots(figsize=(1.5 * (1 + len(self.tokens)) + 1, 1.5 * rows))
        else:
            fig = ax.figure
        ax.imshow(self.montage(), interpolation="nearest")
        step = self.image_size + 2
        ax.set_xticks([step * c + self.image_size / 2 for c in range(1 + len(self.tokens))])
        ax.set_xticklabels(["image", *(f"{t} mean" for t in self.tokens)], fontsize=8)
        ax.set_yticks([step * r + self.image_size / 2 for r in range(len(self.names))])
        ax.set_yticklabels(self.names, fontsize=7)
        ax.tick_params(length=0)
        ax.set_title(f"{self.model}: class-token attention", fontsize=9)
        return fig, ax

    def save_figures(self, directory: str | Path) -> list[Path]:
        """Write ``directory``/attention/{i:03d}-{name}.png per image and
        ``directory``/attention-grid.png; every figure is closed after saving."""
        from narrows.plotting import pyplot
        from narrows.runs.files import atomic_savefig

        plt = pyplot()
        directory = Path(directory)
        (directory / "attention").mkdir(parents=True, exist_ok=True)
        written = []
        for i, name in enumerate(self.names):
            fig = self.figure(i)
            safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)[:60] or "image"
            try:
                written.append(atomic_savefig(directory / "attention" / f"{i:03d}-{safe}.png",
                                              fig, dpi=120))
            finally:
                plt.close(fig)
        fig, _ = self.plot()
        try:
            written.append(atomic_savefig(directory / "attention-grid.png", fig, dpi=120,
                                          bbox_inches="tight"))
        finally:
            plt.close(fig)
        return written
