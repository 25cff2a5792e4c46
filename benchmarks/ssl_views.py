"""Views per second per core of narrows' UDI view pipeline against a straightforward PIL one.

Both sides make the same views of one decoded image (decoding excluded), on one thread, with
the same crop parameters (drawn by ``narrows.ssl.geometry`` on both sides, so the work is
identical) and the same photometric decisions (spec §2.2) and maps (spec §3):

* **pil**: the upstream style — PIL ``crop`` / ``transpose`` / ``resize(BICUBIC)`` per crop, then
  torchvision's PIL ``ColorJitter`` (in a random order) with p 0.8, grayscale p 0.2,
  ``ImageFilter.GaussianBlur`` / ``ImageOps.solarize`` in the two-branch scheme, ``ToTensor`` +
  ``Normalize``; maps built per (source, target) pair and per sample with small torch ops, as
  upstream's ``_create_map`` does;
* **narrows**: ``MultiCropViews`` (crop/flip/resize on the uint8 tensor, all maps of an image
  vectorised) then ``photometric`` on the globals and on the locals (per crop decisions,
  vectorised), i.e. what ``ViewDataset`` does in a worker;
* **narrows-batched16**: the same geometry per image, photometric once on the crops of 16 images
  (what the trainer's ``--augment-device`` path does, here on the CPU); time per image.

Settings: ``imagenet`` = 2 × 224 + 10 × 96 crops (patch 16, SRS windows 3/2) from a 375×500
image; ``small`` = 2 × 32 + 2 × 16 (patch 4, windows 3/2) from a 48×48 image. Interleaved
repetitions after a warm-up, alternating which side goes first; ratio of medians. Target:
narrows / pil ≥ 2× views per second.

    python benchmarks/ssl_views.py [--configs imagenet small] [--repeats N] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from narrows.ssl import geometry
from narrows.ssl.views import MultiCropViews, ViewOptions, photometric

CONFIGS = {
    "imagenet": (ViewOptions(global_size=224, local_size=96, patch_size=16, n_local=10), (375, 500), 20),
    "small": (ViewOptions(global_size=32, local_size=16, patch_size=4, n_local=2), (48, 48), 200),
}


class PILViews:
    """The straightforward implementation: PIL image ops per crop, per-pair map building."""

    def __init__(self, o: ViewOptions) -> None:
        self.o = o
        self.jitter = T.ColorJitter(o.brightness, o.contrast, o.saturation, o.hue)
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(o.mean, o.std)])

    def blur(self, img: Image.Image, p: float) -> Image.Image:
        if random.random() <= p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.o.blur_radius)))
        return img

    def photometric(self, img: Image.Image) -> torch.Tensor:
        o = self.o
        if random.random() < o.jitter_p:
            img = self.jitter(img)
        if random.random() < o.grayscale_p:
            img = img.convert("L").convert("RGB")
        if random.random() < o.blur_branch_p:
            img = self.blur(img, o.blur_p[0] if random.random() < 0.5 else o.blur_p[1])
        else:
            img = self.blur(img, o.blur_p_solarize_branch)
            if random.random() < o.solarize_p:
                img = ImageOps.solarize(img)
        return self.to_tensor(img)

    def crop(self, img: Image.Image, c: geometry.Crop, size: int) -> Image.Image:
        out = img.crop((c.left, c.top, c.left + c.width, c.top + c.height))
        if c.flipped:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return out.resize((size, size), Image.BICUBIC)

    @staticmethod
    def lattice(size: int) -> torch.Tensor:
        u = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        return torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)

    def create_map(self, src: geometry.Crop, tgt: geometry.Crop, mask: torch.Tensor, fs: int, ft: int):
        s0, s1 = torch.tensor(src.frame()[:2]), torch.tensor(src.frame()[2:])
        t0, t1 = torch.tensor(tgt.frame()[:2]), torch.tensor(tgt.frame()[2:])
        pts = s0 + self.lattice(fs)[mask] * (s1 - s0)
        lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)
        valid = ((pts > lo) & (pts < hi)).all(-1)
        samples = int(mask.sum())
        src_map = torch.zeros(samples, fs * fs)
        tokens = mask.nonzero().squeeze(1)[valid]
        src_map[torch.arange(len(tokens)), tokens] = 1
        tgt_map = torch.zeros(samples, ft, ft)
        cont = ((pts[valid] - t0) / (t1 - t0) * ft - 0.5).clamp(0, ft - 1)
        for r, (ti, tj) in enumerate(cont.tolist()):
            i0, j0 = min(int(ti), ft - 2), min(int(tj), ft - 2)
            fi, fj = ti - i0, tj - j0
            tgt_map[r, i0, j0] += (1 - fi) * (1 - fj)
            tgt_map[r, i0, j0 + 1] += (1 - fi) * fj
            tgt_map[r, i0 + 1, j0] += fi * (1 - fj)
            tgt_map[r, i0 + 1, j0 + 1] += fi * fj
        return src_map, tgt_map.flatten(1)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> dict:
        o = self.o
        w, h = img.size
        a, b = geometry.global_pair(h, w, o.global_scale, generator)
        locs = geometry.local_crops(h, w, o.n_local, o.local_scale, geometry.local_reference(a, b),
                                    generator)
        fg, fl = o.global_grid, o.local_grid
        mask_g = geometry.srs_mask(fg, o.global_window, generator)
        mask_l = geometry.srs_mask(fl, o.local_window, generator)
        crops = [self.photometric(self.crop(img, c, o.global_size)) for c in (a, b)]
        crops += [self.photometric(self.crop(img, c, o.local_size)) for c in locs]
        maps = [self.create_map(a, b, mask_g, fg, fg), self.create_map(b, a, mask_g, fg, fg)]
        for c in locs:
            maps += [self.create_map(c, b, mask_l, fl, fg), self.create_map(c, a, mask_l, fl, fg)]
        return {"crops": crops, "maps": maps}


def narrows_views(views: MultiCropViews):
    def run(image: torch.Tensor, generator: torch.Generator) -> dict:
        s = views(image, generator)
        s["globals"] = photometric(s["globals"], views.options, generator)
        s["locals"] = photometric(s["locals"], views.options, generator)
        return s
    return run


def narrows_batched(views: MultiCropViews, batch: int):
    """Geometry per image, photometric once per batch of images (the ``--augment-device`` way,
    here on the CPU); returns the time of one image (a batch divided by its size)."""
    def run(image: torch.Tensor, generator: torch.Generator) -> dict:
        samples = [views(image, generator) for _ in range(batch)]
        globals_ = torch.cat([s["globals"] for s in samples])
        locals_ = torch.cat([s["locals"] for s in samples])
        return {"globals": photometric(globals_, views.options, generator),
                "locals": photometric(locals_, views.options, generator)}
    return run


BATCH = 16


def bench(name: str, repeats: int | None) -> None:
    o, (h, w), default_repeats = CONFIGS[name]
    repeats = repeats or default_repeats
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pil_image, tensor_image = Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1).contiguous()
    sides = {"pil": (PILViews(o), pil_image), "narrows": (narrows_views(MultiCropViews(o)), tensor_image),
             f"narrows-batched{BATCH}": (narrows_batched(MultiCropViews(o), BATCH), tensor_image)}
    per_call = {"pil": 1, "narrows": 1, f"narrows-batched{BATCH}": BATCH}
    # sanity: both sides give the same maps for the same draws
    ref = sides["pil"][0](pil_image, torch.Generator().manual_seed(1))
    ours = MultiCropViews(o)(tensor_image, torch.Generator().manual_seed(1))
    same = torch.allclose(ref["maps"][0][1], ours["tgt_global"][0], atol=1e-5)
    times: dict[str, list[float]] = {s: [] for s in sides}
    random.seed(0)
    for rep in range(repeats + 1):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for side in order:
            fn, img = sides[side]
            g = torch.Generator().manual_seed(rep)
            start = time.perf_counter()
            fn(img, g)
            if rep:
                times[side].append((time.perf_counter() - start) / per_call[side])
    views_per_image = 2 + o.n_local
    med = {s: statistics.median(v) for s, v in times.items()}
    print(f"\n{name}: 2 × {o.global_size} + {o.n_local} × {o.local_size} from {h}×{w}, "
          f"{repeats} repetitions, maps agree: {same}")
    for s in sides:
        print(f"  {s:<18} {1e3 * med[s]:8.2f} ms/image  {views_per_image / med[s]:9.1f} views/s/core  "
              f"speed vs pil {med['pil'] / med[s]:.2f}×")
    print(f"  narrows (per sample, in workers) / pil speed: {med['pil'] / med['narrows']:.2f}× "
          "(target ≥ 2×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for name in args.configs:
        bench(name, args.repeats)


if __name__ == "__main__":
    main()
