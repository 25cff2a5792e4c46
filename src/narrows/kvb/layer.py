"""The discrete key-value bottleneck layer.

An embedding ``z`` (``(B, D)`` or ``(B, n, D)`` for n tokens) is cut into C heads by a fixed
projection, each head snaps to its nearest key(s) in its own codebook of J keys, and the value
vectors stored with those keys are fetched and decoded. Keys and projection are buffers (fitted
once by :meth:`KeyValueBottleneck.init_keys`, then frozen); the values are the only trained
parameter, so a gradient step touches only the value rows the batch fetched.

Shapes used throughout: C heads (``num_codebooks``), J pairs per head (``num_pairs``), k key
dimension (``dim_key``), V value dimension (``dim_value``), t pairs fetched per head (``topk``),
K classes (``num_classes``).

Where this differs from the reference code, on purpose:

* the search never builds the full ``(C, B, J)`` distance tensor (chunks of heads and queries)
  and usage is counted with an index-add, not a ``(C, B, t, J)`` one-hot;
* pruned pairs get distance +inf (the reference uses the batch's largest distance, which a
  used key at exactly that distance ties with);
* usage is counted only in training mode, so an evaluation can never count test data (the
  reference counts on every forward while a flag is on, whatever the module's mode);
* keys and P are buffers, frozen by :meth:`KeyValueBottleneck.freeze` and saved with the flag;
  there is no straight-through path and no key update outside :meth:`init_keys`;
* key-initialisation restarts keep the EMA statistics consistent (:mod:`narrows.kvb.keys`).
Not offered: Gumbel sampling of keys, ``learned_projection`` (a frozen random linear map in the
reference), appending distances to values, the ``kmeans`` key init mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.kvb.keys import KeyInitStats, fit_keys

SPLITTING_MODES = ("random_projection", "chunk")
DECODERS = ("codebook-voting-logits", "linear-probe", "lp-no-bias", "mlp-128")

#: Distances computed at once by the search (per chunk of heads × queries × keys): 64 MB fp32.
SEARCH_CHUNK_ELEMENTS = 1 << 24


def _ordered_keys(dist: Tensor) -> Tensor:
    """int64 keys sorting like ``(dist, index)`` along the last axis, all distinct.

    Float32 bits are mapped to an order-preserving signed int32 and shifted above the index, so
    ``topk`` over the keys is the top-t with ties broken towards the lowest index exactly
    (``topk`` itself does not promise an order among equal values).
    """
    bits = (dist + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0: -0 becomes +0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    index = torch.arange(dist.shape[-1], device=dist.device, dtype=torch.int64)
    return bits * (1 << 32) + index


def nearest_keys(
    heads: Tensor,
    keys: Tensor,
    topk: int = 1,
    *,
    exclude: Tensor | None = None,
    chunk_heads: int = 16,
    chunk_elements: int = SEARCH_CHUNK_ELEMENTS,
) -> Tensor:
    """Exact top-t (t = ``topk``) nearest keys of every head vector, ties to the lowest index.

    ``heads`` is ``(C, Q, k)`` (Q queries per head), ``keys`` ``(C, J, k)``; returns ``(C, Q, t)``
    int64, nearest first. ``exclude`` (``(C, J)`` bool) removes pairs from the search (distance
    +inf; a head with fewer than t allowed pairs fills up with excluded ones, lowest index first).
    The squared distance is ranked as ``‖K‖² − 2⟨h, K⟩`` (``‖h‖²`` does not change the order),
    ``chunk_heads`` heads and as many queries as fit ``chunk_elements`` distances at a time; the
    chunking changes nothing but memory. "Exact" is the argmin of that float distance: it agrees
    with a float64 brute force except between keys whose squared distances differ by less than
    the float rounding, about 1e-7 · (‖h‖² + ‖K‖²) in float32 (near-duplicate keys, e.g. several
    restarts onto one sample); between such keys CPU and GPU may choose differently.
    """
    num_heads, num_queries, _ = heads.shape
    num_pairs = keys.shape[1]
    if topk > num_pairs:
        raise ValueError(f"topk {topk} exceeds the {num_pairs} pairs per codebook")
    keys = keys.to(heads.dtype)
    norms = keys.pow(2).sum(-1)  # (C, J)
    out = torch.empty(num_heads, num_queries, topk, dtype=torch.int64, device=heads.device)
    chunk_heads = max(1, min(chunk_heads, num_heads))
    chunk_queries = max(1, chunk_elements // (chunk_heads * num_pairs))
    for c0 in range(0, num_heads, chunk_heads):
        c1 = min(c0 + chunk_heads, num_heads)
        k_t = keys[c0:c1].transpose(1, 2)  # (c, k, J)
        base = norms[c0:c1].unsqueeze(1)  # (c, 1, J)
        if exclude is not None:
            base = base.masked_fill(exclude[c0:c1].unsqueeze(1), math.inf)
        for q0 in range(0, num_queries, chunk_queries):
            q1 = min(q0 + chunk_queries, num_queries)
            dist = torch.baddbmm(base, heads[c0:c1, q0:q1], k_t, alpha=-2.0)  # inf stays inf
            if topk == 1:
                out[c0:c1, q0:q1, 0] = dist.argmin(-1)
            elif dist.dtype == torch.float64:
                out[c0:c1, q0:q1] = dist.sort(dim=-1, stable=True).indices[..., :topk]
            else:
                order = _ordered_keys(dist.float()).topk(topk, dim=-1, largest=False, sorted=True)
                out[c0:c1, q0:q1] = order.indices
    return out


class KeyValueBottleneck(nn.Module):
    """Discrete key-value bottleneck: random heads, frozen per-head codebooks, trained values.

    Embeddings of ``dim_embed`` (D) dimensions are split into ``num_codebooks`` (C) heads of
    ``dim_key`` (k) dimensions; each head has ``num_pairs`` (J) key-value pairs, values of
    ``dim_value`` (V) dimensions, and fetches its ``topk`` (t) nearest keys.

    ``splitting_mode``: ``"random_projection"`` (P ``(C, D, k)`` with N(0, 1) entries, every
    column ``P[c, :, u]`` rescaled to unit norm) or ``"chunk"`` (head c is ``z[c·k:(c+1)·k]``;
    needs ``C·k = D``; P is then the matching 0/1 selector, kept for a uniform state dict).

    ``decoder``: ``"codebook-voting-logits"`` (default, no parameters: the sum over the t
    fetched values, mean over heads and tokens; needs ``num_classes == dim_value``), or the
    parametric ``"linear-probe"``, ``"lp-no-bias"``, ``"mlp-128"`` over all fetched values
    flattened (``num_tokens·C·t·V`` inputs), frozen at their seeded random init unless
    ``train_decoder``. ``num_classes`` defaults to ``dim_value``.

    Key initialisation: ``decay`` (EMA γ), ``eps`` (Laplace ε), ``threshold_factor`` (dead-code
    θ = factor · queries per batch / J); see :meth:`init_keys`. ``seed`` fixes P, the initial keys,
    the parametric decoder's init and the restart draws. ``chunk_heads`` bounds the search's
    memory (:func:`nearest_keys`). ``dropout`` drops whole heads before the vote (training only).

    Buffers: ``projection (C, D, k)``, ``keys (C, J, k)``, ``ema_counts (C, J)``,
    ``ema_sums (C, J, k)``, ``usage (C, J)`` (int64 fetch counts since :meth:`freeze`) and
    ``frozen_flag``; parameter: ``values (C, J, V)``, zero-initialised.
    """

    def __init__(
        self,
        dim_embed: int,
        num_codebooks: int,
        num_pairs: int,
        dim_key: int,
        dim_value: int,
        *,
        topk: int = 1,
        splitting_mode: str = "random_projection",
        decoder: str = "codebook-voting-logits",
        num_classes: int | None = None,
        decay: float = 0.95,
        eps: float = 1e-5,
        threshold_factor: float = 0.1,
        seed: int = 0,
        chunk_heads: int = 16,
        num_tokens: int = 1,
        train_decoder: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("dim_embed", dim_embed), ("num_codebooks", num_codebooks),
                            ("num_pairs", num_pairs), ("dim_key", dim_key),
                            ("dim_value", dim_value), ("topk", topk), ("chunk_heads", chunk_heads),
                            ("num_tokens", num_tokens)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if topk > num_pairs:
            raise ValueError(f"topk {topk} exceeds num_pairs {num_pairs}")
        if splitting_mode not in SPLITTING_MODES:
            raise ValueError(f"splitting_mode must be one of {SPLITTING_MODES}, got {splitting_mode!r}")
        if splitting_mode == "chunk" and num_codebooks * dim_key != dim_embed:
            raise ValueError(
                f"splitting_mode 'chunk' needs num_codebooks·dim_key = dim_embed, got "
                f"{num_codebooks}·{dim_key} ≠ {dim_embed}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        num_classes = dim_value if num_classes is None else int(num_classes)
        if decoder == "codebook-voting-logits" and num_classes != dim_value:
            raise ValueError(
                f"the voting decoder uses the values as logits: dim_value ({dim_value}) must "
                f"equal num_classes ({num_classes})")
        for name, value in (("decay", decay), ("dropout", dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

        self.dim_embed = int(dim_embed)
        self.num_codebooks = int(num_codebooks)
        self.num_pairs = int(num_pairs)
        self.dim_key = int(dim_key)
        self.dim_value = int(dim_value)
        self.topk = int(topk)
        self.splitting_mode = splitting_mode
        self.decoder_name = decoder
        self.num_classes = num_classes
        self.decay = float(decay)
        self.eps = float(eps)
        self.threshold_factor = float(threshold_factor)
        self.seed = int(seed)
        self.chunk_heads = int(chunk_heads)
        self.num_tokens = int(num_tokens)

        gen = torch.Generator().manual_seed(self.seed)
        C, D, J, k, V = num_codebooks, dim_embed, num_pairs, dim_key, dim_value
        if splitting_mode == "random_projection":
            projection = torch.randn(C, D, k, generator=gen)
            projection /= projection.norm(dim=1, keepdim=True)
        else:
            projection = torch.eye(D).view(D, C, k).permute(1, 0, 2).contiguous()
        keys = torch.randn(C, J, k, generator=gen)
        self.register_buffer("projection", projection)
        self.register_buffer("keys", keys)
        self.register_buffer("ema_counts", torch.zeros(C, J))
        self.register_buffer("ema_sums", keys.clone())
        self.register_buffer("usage", torch.zeros(C, J, dtype=torch.int64))
        self.register_buffer("frozen_flag", torch.tensor(False))
        self.values = nn.Parameter(torch.zeros(C, J, V))
        self._flat_cache: tuple[Tensor, int, Tensor] | None = None

        self.dropout = nn.Dropout1d(dropout) if dropout > 0 else None
        self.decoder: nn.Module | None = None
        if decoder != "codebook-voting-logits":
            fan_in = self.num_tokens * C * self.topk * V
            state = torch.random.get_rng_state()
            torch.manual_seed(self.seed)  # a seeded, reproducible decoder init
            try:
                if decoder == "mlp-128":
                    self.decoder = nn.Sequential(nn.Linear(fan_in, 128), nn.ReLU(),
                                                 nn.Linear(128, num_classes))
                else:
                    self.decoder = nn.Linear(fan_in, num_classes, bias=decoder == "linear-probe")
            finally:
                torch.random.set_rng_state(state)
            self.decoder.requires_grad_(bool(train_decoder))

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_flat_cache"] = None  # derived from P; not pickled or deep-copied
        return state

    @property
    def frozen(self) -> bool:
        """Whether the keys are frozen (set by :meth:`freeze`; saved in the state dict)."""
        return bool(self.frozen_flag)

    def freeze(self) -> None:
        """Freeze keys (no further :meth:`init_keys`) and reset the usage counter to 0."""
        self.frozen_flag.fill_(True)
        self.usage.zero_()

    @torch.no_grad()
    def reset_values(self, init: str = "zeros", seed: int | None = None) -> None:
        """Re-create the values (``"zeros"``, ``"rand"`` U[0, 1) or ``"randn"``, drawn from
        ``seed``, default the layer's) and reset the usage counter; keys stay as they are."""
        if init == "zeros":
            self.values.zero_()
        elif init in ("rand", "randn"):
            gen = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
            draw = torch.rand if init == "rand" else torch.randn
            self.values.copy_(draw(self.values.shape, generator=gen))
        else:
            raise ValueError(f"init must be 'zeros', 'rand' or 'randn', got {init!r}")
        self.usage.zero_()

    def extra_repr(self) -> str:
        return (f"dim_embed={self.dim_embed}, num_codebooks={self.num_codebooks}, "
                f"num_pairs={self.num_pairs}, dim_key={self.dim_key}, dim_value={self.dim_value}, "
                f"topk={self.topk}, splitting_mode={self.splitting_mode!r}, "
                f"decoder={self.decoder_name!r}, num_classes={self.num_classes}")

    # ------------------------------------------------------------------ lookup

    def _tokens(self, z: Tensor) -> Tensor:
        if z.dim() == 2:
            z = z.unsqueeze(1)
        if z.dim() != 3 or z.shape[-1] != self.dim_embed:
            raise ValueError(
                f"expected embeddings (B, {self.dim_embed}) or (B, n, {self.dim_embed}), "
                f"got {tuple(z.shape)}")
        return z.to(self.projection.dtype)

    def heads(self, z: Tensor) -> Tensor:
        """Head vectors ``(B, n, C, k)`` of embeddings ``(B, D)`` or ``(B, n, D)``."""
        z = self._tokens(z)
        b, n, _ = z.shape
        C, k = self.num_codebooks, self.dim_key
        if self.splitting_mode == "chunk":
            return z.reshape(b, n, C, k)
        return (z.reshape(b * n, self.dim_embed) @ self._flat_projection()).view(b, n, C, k)

    def _flat_projection(self) -> Tensor:
        """P as one ``(D, C·k)`` matrix (one GEMM for all heads), rebuilt when P changes."""
        p = self.projection
        cached = self._flat_cache
        if cached is None or cached[0] is not p or cached[1] != p._version:
            flat = p.permute(1, 0, 2).reshape(self.dim_embed, -1).contiguous()
            cached = self._flat_cache = (p, p._version, flat)
        return cached[2]

    def search(self, heads: Tensor, *, prune: bool = False, topk: int | None = None) -> Tensor:
        """Indices ``(B, n, C, t)`` of the t nearest keys of head vectors ``(B, n, C, k)``.

        Exact (equal to a brute-force argmin of the squared distance, ties to the lowest index),
        nearest first. ``prune``: never-fetched pairs (usage 0) are left out, so a head answers
        with its nearest *used* key. ``topk`` overrides the layer's t.
        """
        if heads.dim() != 4 or heads.shape[-2:] != (self.num_codebooks, self.dim_key):
            raise ValueError(
                f"expected heads (B, n, {self.num_codebooks}, {self.dim_key}), "
                f"got {tuple(heads.shape)}")
        b, n, C, k = heads.shape
        t = self.topk if topk is None else int(topk)
        per_head = heads.reshape(b * n, C, k).transpose(0, 1).contiguous()
        exclude = self.usage == 0 if prune else None
        found = nearest_keys(per_head, self.keys, t, exclude=exclude,
                             chunk_heads=self.chunk_heads)
        return found.permute(1, 0, 2).reshape(b, n, C, t)

    @torch.no_grad()
    def indices(self, z: Tensor, *, prune: bool = False) -> Tensor:
        """Fetched pair indices ``(B, n, C, t)`` of embeddings (heads + search, no gradient)."""
        return self.search(self.heads(z), prune=prune)

    @torch.no_grad()
    def count_usage(self, idx: Tensor) -> None:
        """Add one to ``usage`` for every fetched (head, pair) in ``idx`` ``(..., C, t)``."""
        flat = self._flat(idx).reshape(-1)
        self.usage.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def _flat(self, idx: Tensor) -> Tensor:
        """Row numbers into ``values.view(C·J, V)`` of indices ``(..., C, t)``."""
        idx = idx.to(device=self.values.device, dtype=torch.int64)
        offsets = torch.arange(self.num_codebooks, device=idx.device, dtype=torch.int64)
        return idx + (offsets * self.num_pairs).unsqueeze(-1)

    def fetch(self, idx: Tensor) -> Tensor:
        """Values ``(B, n, C, t, V)`` at indices ``(B, n, C, t)`` (differentiable in the values)."""
        return F.embedding(self._flat(idx), self.values.view(-1, self.dim_value))

    # ------------------------------------------------------------------ decoding

    def decode(self, fetched: Tensor) -> Tensor:
        """Logits ``(B, K)`` of fetched values ``(B, n, C, t, V)``."""
        b, n, C, t, V = fetched.shape
        if self.dropout is not None and self.training:
            fetched = self.dropout(fetched.transpose(1, 2).reshape(b, C, n * t * V))
            fetched = fetched.view(b, C, n, t, V).transpose(1, 2)
        if self.decoder is None:
            return fetched.sum(3).mean(dim=(1, 2))
        if n * C * t * V != self.decoder_in_features:
            raise ValueError(
                f"the {self.decoder_name} decoder was built for {self.num_tokens} token(s); got {n}")
        return self.decoder(fetched.reshape(b, -1))

    @property
    def decoder_in_features(self) -> int:
        return self.num_tokens * self.num_codebooks * self.topk * self.dim_value

    def logits_from_indices(self, idx: Tensor) -> Tensor:
        """Logits ``(B, K)`` from fetched indices ``(B, n, C, t)`` (no search, no counting)."""
        return self.decode(self.fetch(idx))

    def forward(self, z: Tensor, *, prune: bool | None = None) -> Tensor:
        """Logits ``(B, K)`` of embeddings ``(B, D)`` or ``(B, n, D)``.

        ``prune`` (default: ``not self.training``) leaves never-fetched pairs out of the search.
        In training mode the fetched pairs are counted in ``usage``; in eval mode nothing is
        counted, so evaluating never marks pairs as used.
        """
        if prune is None:
            prune = not self.training
        idx = self.indices(z, prune=prune)
        if self.training:
            self.count_usage(idx)
        return self.logits_from_indices(idx)

    # ------------------------------------------------------------------ keys

    def init_keys(
        self,
        batches: Iterable[Tensor],
        epochs: int = 10,
        progress: bool = False,
        *,
        restart_mode: str = "reset",
        freeze: bool = True,
    ) -> KeyInitStats:
        """Fit the keys by per-head EMA k-means on unlabelled embedding batches, then freeze.

        ``batches`` is iterated ``epochs`` times (a list or a DataLoader, not a one-shot
        iterator); each item is an embedding tensor ``(B, D)`` or ``(B, n, D)`` (a tuple's first
        element is taken, so labelled loaders work; labels are never read). Algorithm and
        ``restart_mode`` in :func:`narrows.kvb.keys.fit_keys`.
        """
        if self.frozen:
            raise RuntimeError("the keys are frozen; key initialisation runs before freeze()")
        stats = fit_keys(self, batches, epochs=epochs, progress=progress,
                         restart_mode=restart_mode)
        if freeze:
            self.freeze()
        return stats
