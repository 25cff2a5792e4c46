"""The per-element noise bottleneck of IBA (spec §1) and a hook that attaches it to a layer.

Z = (λ⊙R + (1−λ)⊙ε)⊙m with ε = σ⊙N(0,1) + μ drawn fresh on every forward, λ = G*sigmoid(α),
and the per-element capacity KL(N(λr̃, (1−λ)²) ‖ N(0,1)) in nats, r̃ = (R − μ)/σ.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from narrows.attribution.statistics import FeatureStatistics
from narrows.errors import UserError
from narrows.models.layers import get_layer, hooked, tensor_output


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 2-D Gaussian of standard deviation σ = ``sigma`` (in feature cells), size
    2·round(2σ)+1 (5×5 for σ = 1), shaped (1, 1, k, k)."""
    radius = int(round(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


class Bottleneck(nn.Module):
    """Noise bottleneck over per-sample feature shape S (``(C, h, w)`` maps or ``(N, D)`` tokens).

    ``mean``, ``std`` (the features' μ, σ) and ``mask`` (bool: elements that take part) are
    shaped S. ``alpha_init`` is α's initial value (λ = sigmoid(α)); ``sigma`` the Gaussian
    blur of λ in feature cells (0: none; token maps are not blurred); ``relu`` clamps the
    output at ≥ 0.

    Only ``alpha`` is a parameter. After each forward, ``capacity`` holds the per-element
    capacity (nats, shaped B×S, zero where the mask is off). With ``active = False`` the module
    is the identity. ``expand_to`` repeats a batch-of-one input B times before the noise.
    ``generator`` (a ``torch.Generator`` on the features' device), when set, draws the noise
    instead of the global RNG.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor, *,
                 alpha_init: float = 5.0, sigma: float = 1.0, relu: bool = False) -> None:
        super().__init__()
        if not (mean.shape == std.shape == mask.shape):
            raise ValueError("mean, std and mask must have one shape")
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())
        self.register_buffer("mask", mask.detach().bool().clone())
        self.alpha = nn.Parameter(torch.full(tuple(mean.shape), float(alpha_init)))
        self.spatial = mean.dim() == 3 and sigma > 0
        kernel = gaussian_kernel(sigma) if self.spatial else torch.ones(1, 1, 1, 1)
        self.register_buffer("kernel", kernel)
        self.relu = relu
        self.active = True
        self.expand_to: int | None = None
        self.generator: torch.Generator | None = None
        self.capacity: torch.Tensor | None = None

    @classmethod
    def from_statistics(cls, stats: FeatureStatistics, *, alpha_init: float = 5.0,
                        sigma: float = 1.0, relu: bool | None = None) -> Bottleneck:
        """A bottleneck with μ, σ (clamped) and mask of ``stats``; ``relu`` defaults to its kind."""
        return cls(stats.mean, stats.std, stats.active, alpha_init=alpha_init, sigma=sigma,
                   relu=stats.relu if relu is None else relu)

    def reset_alpha(self, value: float) -> None:
        with torch.no_grad():
            self.alpha.fill_(value)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise Gaussian blur of an S-shaped tensor over (h, w); identity for token maps."""
        if not self.spatial:
            return x
        channels, pad = x.shape[0], self.kernel.shape[-1] // 2
        mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
        padded = F.pad(x[None], (pad, pad, pad, pad), mode=mode)
        weight = self.kernel.expand(channels, 1, -1, -1)
        return F.conv2d(padded, weight, groups=channels)[0]

    def lambdas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ, 1−λ); 1−λ is G*sigmoid(−α), which has no cancellation for large α."""
        return self.blur(torch.sigmoid(self.alpha)), self.blur(torch.sigmoid(-self.alpha))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return r
        if self.expand_to is not None and r.shape[0] == 1:
            r = r.expand(self.expand_to, *r.shape[1:])
        if tuple(r.shape[1:]) != tuple(self.alpha.shape):
            raise UserError(f"the layer's features are shaped {tuple(r.shape[1:])} but the "
                            f"statistics are shaped {tuple(self.alpha.shape)}",
                            "estimate statistics at this layer and input resolution")
        lam, one_minus = self.lambdas()
        if self.generator is None:
            noise = torch.randn_like(r)
        else:
            noise = torch.randn(r.shape, generator=self.generator, dtype=r.dtype, device=r.device)
        eps = self.std * noise + self.mean
        z = lam * r + one_minus * eps
        z = torch.where(self.mask, z, torch.zeros((), dtype=z.dtype, device=z.device))
        if self.relu:
            z = z.clamp(min=0)
        r_norm = (r - self.mean) / self.std
        self.capacity = capacity(lam, one_minus, r_norm, self.mask)
        return z

    @contextmanager
    def attached(self, model: nn.Module, layer: str) -> Iterator[Bottleneck]:
        """Replace ``layer``'s output by this bottleneck's inside the block; always detaches."""
        def hook(module: nn.Module, args: object, output: object) -> torch.Tensor:
            return self(tensor_output(layer, output))

        with hooked(get_layer(model, layer), hook):
            yield self


def capacity(lam: torch.Tensor, one_minus: torch.Tensor, r_norm: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """½[(1−λ)² + (λr̃)² − 1 − ln((1−λ)²)] in nats, 0 where ``mask`` is off (NaN-safe), with
    λ = ``lam``, 1−λ = ``one_minus`` and r̃ = ``r_norm`` (the normalised features), element-wise."""
    cap = 0.5 * (one_minus**2 + (lam * r_norm) ** 2 - 1 - 2 * torch.log(one_minus))
    return torch.where(mask, cap, torch.zeros((), dtype=cap.dtype, device=cap.device))

