"""The key-value bottleneck layer, its key initialisation and value training from cached indices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from narrows.kvb import (
    KeyValueBottleneck,
    cache_indices,
    ema_step,
    epoch_order,
    logits_from_cache,
    nearest_keys,
    pruned_indices,
    train_values,
)

D, C, J, K_DIM, V = 32, 8, 64, 4, 10


def small(**kwargs) -> KeyValueBottleneck:
    return KeyValueBottleneck(D, C, J, K_DIM, V, **kwargs)


def frozen_layer(seed: int = 0, samples: int = 256, **kwargs) -> tuple[KeyValueBottleneck, torch.Tensor]:
    layer = small(seed=seed, **kwargs)
    z = torch.randn(samples, D, generator=torch.Generator().manual_seed(seed + 100))
    layer.init_keys([z[i:i + 64] for i in range(0, samples, 64)], epochs=2)
    return layer, z


def brute_force(heads: torch.Tensor, keys: torch.Tensor, t: int,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(C, Q, t): full float64 distances, stable sort (ties to the lowest index)."""
    dist = (heads.double().unsqueeze(2) - keys.double().unsqueeze(1)).pow(2).sum(-1)
    if exclude is not None:
        dist = dist.masked_fill(exclude.unsqueeze(1), math.inf)
    return dist.sort(dim=-1, stable=True).indices[..., :t]


# ----------------------------------------------------------------------------- shapes, buffers


def test_shapes_at_reduced_size():
    layer = small(topk=2)
    z = torch.randn(5, D)
    assert layer.projection.shape == (C, D, K_DIM)
    assert layer.keys.shape == layer.ema_sums.shape == (C, J, K_DIM)
    assert layer.ema_counts.shape == layer.usage.shape == (C, J)
    assert layer.values.shape == (C, J, V) and not layer.values.detach().any()
    assert layer.heads(z).shape == (5, 1, C, K_DIM)
    assert layer.indices(z).shape == (5, 1, C, 2)
    assert layer.fetch(layer.indices(z)).shape == (5, 1, C, 2, V)
    assert layer(z).shape == (5, V)
    tokens = torch.randn(5, 3, D)
    assert layer.indices(tokens).shape == (5, 3, C, 2)
    assert layer(tokens).shape == (5, V)
    for decoder in ("linear-probe", "lp-no-bias", "mlp-128"):
        parametric = small(decoder=decoder, num_classes=7, num_tokens=3, topk=2)
        assert parametric(tokens).shape == (5, 7)
    with pytest.raises(ValueError, match="expected embeddings"):
        layer(torch.randn(5, D + 1))


def test_projection_columns_unit_norm_and_buffers_not_parameters():
    layer = small()
    norms = layer.projection.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert [name for name, _ in layer.named_parameters()] == ["values"]
    state = layer.state_dict()
    for name in ("projection", "keys", "ema_counts", "ema_sums", "usage", "frozen_flag"):
        assert name in state
    assert all(p is not layer.keys and p is not layer.projection for p in layer.parameters())
    # same seed, same projection and keys; another seed, others
    assert torch.equal(small(seed=0).projection, layer.projection)
    assert not torch.equal(small(seed=1).keys, layer.keys)


def test_chunk_splitting_is_slicing():
    layer = KeyValueBottleneck(12, 3, 16, 4, 5, splitting_mode="chunk")
    z = torch.randn(6, 12)
    assert torch.equal(layer.heads(z), z.view(6, 1, 3, 4))
    # the selector kept as P gives the same heads
    assert torch.equal(torch.einsum("bd,cdk->bck", z, layer.projection), z.view(6, 3, 4))
    with pytest.raises(ValueError, match="chunk"):
        KeyValueBottleneck(12, 3, 16, 5, 5, splitting_mode="chunk")


def test_voting_decoder_rejects_value_dim_other_than_classes():
    with pytest.raises(ValueError, match="dim_value"):
        small(num_classes=V + 1)
    assert small(num_classes=V).num_classes == V
    assert small(decoder="linear-probe", num_classes=V + 1).num_classes == V + 1
    with pytest.raises(ValueError, match="decoder"):
        small(decoder="transformer")


def test_parametric_decoders_frozen_unless_asked():
    frozen = small(decoder="mlp-128")
    assert all(not p.requires_grad for p in frozen.decoder.parameters())
    trainable = small(decoder="linear-probe", train_decoder=True)
    assert all(p.requires_grad for p in trainable.decoder.parameters())
    assert small(decoder="lp-no-bias").decoder.bias is None
    # seeded init, independent of the global RNG
    torch.manual_seed(123)
    a = small(decoder="mlp-128", seed=4)
    torch.manual_seed(321)
    b = small(decoder="mlp-128", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_topk_sums_t_values():
    layer = small(topk=3)
    with torch.no_grad():
        layer.values.copy_(torch.randn(C, J, V))
    z = torch.randn(4, D)
    idx = layer.indices(z)
    expected = torch.zeros(4, V)
    for b in range(4):
        for c in range(C):
            for t in range(3):
                expected[b] += layer.values[c, idx[b, 0, c, t]].detach()
    assert torch.allclose(layer(z, prune=False), expected / C, atol=1e-6)


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("topk", [1, 3])
def test_chunked_search_equals_brute_force(topk):
    g = torch.Generator().manual_seed(0)
    heads = torch.randn(10, 120, 5, generator=g)
    keys = torch.randn(10, 50, 5, generator=g)
    expected = brute_force(heads, keys, topk)
    for chunk_heads, elements in ((1, 500), (3, 1000), (16, 1 << 24), (4, 7)):
        found = nearest_keys(heads, keys, topk, chunk_heads=chunk_heads, chunk_elements=elements)
        assert torch.equal(found, expected), (chunk_heads, elements)
    exclude = torch.rand(10, 50, generator=g) < 0.7
    found = nearest_keys(heads, keys, topk, exclude=exclude, chunk_heads=3, chunk_elements=900)
    assert torch.equal(found, brute_force(heads, keys, topk, exclude))


@pytest.mark.parametrize("topk", [1, 2, 4])
def test_search_ties_go_to_the_lowest_index(topk):
    # integer coordinates: every distance is exact, so ties are real ties
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, (4, 6, 3), generator=g).float()
    keys = torch.cat([base, base, base[:, :2]], dim=1)  # keys j, j + 6, j + 12 coincide
    heads = torch.randint(-3, 4, (4, 40, 3), generator=g).float()
    expected = brute_force(heads, keys, topk)
    for chunk_heads, elements in ((1, 14), (2, 100), (4, 1 << 20)):
        assert torch.equal(nearest_keys(heads, keys, topk, chunk_heads=chunk_heads,
                                        chunk_elements=elements), expected)
    # a head vector exactly between two keys takes the lower index
    keys = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [-2.0, 0.0]]])
    assert nearest_keys(torch.zeros(1, 1, 2) + torch.tensor([1.0, 0.0]), keys, 1).item() == 0
    assert nearest_keys(torch.tensor([[[-1.0, 0.0]]]), keys, 2).tolist() == [[[1, 2]]]
    # all excluded: the lowest indices, in order
    found = nearest_keys(heads[:, :3], torch.randn(4, 3, 3), 2,
                         exclude=torch.ones(4, 3, dtype=torch.bool))
    assert found.tolist() == [[[0, 1]] * 3] * 4


def test_pruned_search_answers_with_the_nearest_used_key():
    layer, z = frozen_layer()
    used = torch.rand(C, J, generator=torch.Generator().manual_seed(2)) < 0.3
    layer.usage.copy_(used.long())
    heads = layer.heads(z)
    per_head = heads[:, 0].transpose(0, 1)
    pruned = layer.search(heads, prune=True)[:, 0, :, 0].T
    assert torch.equal(pruned, brute_force(per_head, layer.keys, 1, ~used)[..., 0])
    assert used.gather(1, pruned).all()
    # cached indices repaired for pruning equal a pruned search
    cached = cache_indices(layer, z, batch_size=50)
    assert torch.equal(cache_indices(layer, z, batch_size=1000), cached)
    repaired = pruned_indices(layer, cached, z, batch_size=17)
    assert torch.equal(repaired, layer.indices(z, prune=True))
    layer.eval()
    assert torch.equal(logits_from_cache(layer, repaired, batch_size=100), layer(z))


def test_with_pruning_and_no_training_every_prediction_is_class_zero():
    layer, z = frozen_layer()
    layer.eval()
    assert not layer.usage.any()
    assert torch.equal(layer.indices(z, prune=True), torch.zeros(len(z), 1, C, 1, dtype=torch.long))
    assert (layer(z).argmax(1) == 0).all()
    assert not layer.usage.any()  # evaluation counts nothing


def test_usage_counts_every_fetched_pair_in_training_mode_only():
    layer, z = frozen_layer(topk=2)
    layer.train()
    layer(z[:20])
    idx = layer.indices(z[:20])
    one_hot = F.one_hot(idx, J).sum(dim=(0, 1, 3))  # (C, J)
    assert torch.equal(layer.usage, one_hot)
    layer.eval()
    layer(z)
    assert torch.equal(layer.usage, one_hot)
    layer.freeze()
    assert not layer.usage.any()


# ----------------------------------------------------------------------------- key initialisation


def toy_layer(decay: float = 0.5, eps: float = 0.1) -> KeyValueBottleneck:
    """One head of 3 keys in 2-D: [0, 0], [1, 0], [0, 5]; S = K, N = 0."""
    layer = KeyValueBottleneck(2, 1, 3, 2, 3, splitting_mode="chunk", decay=decay, eps=eps)
    layer.keys.copy_(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]]]))
    layer.ema_sums.copy_(layer.keys)
    layer.ema_counts.zero_()
    return layer


TOY_BATCH = torch.tensor([[[0.1, 0.0]], [[0.9, 0.2]], [[1.1, 0.0]]])  # (Q, C, k): 0 -> key 0, 1, 2 -> key 1


def test_ema_step_matches_hand_computed_keys():
    layer = toy_layer()
    step = ema_step(layer, TOY_BATCH, threshold=0.0)
    # m = [1, 2, 0], s = [[.1, 0], [2, .2], [0, 0]]; γ = 0.5:
    # N = [.5, 1, 0]; S = [[.05, 0], [1.5, .1], [0, 2.5]]
    # Laplace, ε = 0.1: Ñ = (N + .1) / (1.5 + .3) · 1.5 = [.5, 11/12, 1/12]
    assert torch.allclose(layer.ema_counts, torch.tensor([[0.5, 1.0, 0.0]]))
    assert torch.allclose(layer.ema_sums, torch.tensor([[[0.05, 0.0], [1.5, 0.1], [0.0, 2.5]]]))
    expected = torch.tensor([[[0.1, 0.0], [1.8 / 1.1, 0.12 / 1.1], [0.0, 30.0]]])
    assert torch.allclose(layer.keys, expected, atol=1e-5)
    assert step.restarted == 0
    # distortion before the update: (.01 + .01 + .04 + .01) / 3
    assert step.distortion == pytest.approx(0.07 / 3, abs=1e-6)


@pytest.mark.parametrize("mode", ["reset", "upstream"])
def test_dead_code_restart_fires_below_threshold_and_puts_keys_on_samples(mode):
    layer = toy_layer()
    # θ between N_2 = 0 and N_0 = 0.5: only key 2 restarts
    step = ema_step(layer, TOY_BATCH, threshold=0.3, generator=torch.Generator().manual_seed(0),
                    restart_mode=mode)
    assert step.restarted == 1
    assert torch.allclose(layer.keys[0, :2], torch.tensor([[0.1, 0.0], [1.8 / 1.1, 0.12 / 1.1]]))
    restarted = layer.keys[0, 2]
    assert any(torch.equal(restarted, sample) for sample in TOY_BATCH[:, 0])
    if mode == "reset":  # statistics agree with the new position
        assert layer.ema_counts[0, 2].item() == pytest.approx(0.3)
        assert torch.allclose(layer.ema_sums[0, 2], 0.3 * restarted)
    else:  # statistics untouched
        assert layer.ema_counts[0, 2].item() == 0.0
        assert torch.allclose(layer.ema_sums[0, 2], torch.tensor([0.0, 2.5]))
    # no key below θ: nothing restarts
    layer = toy_layer()
    assert ema_step(layer, TOY_BATCH, threshold=0.0, restart_mode=mode).restarted == 0


def test_reset_restarts_draw_distinct_samples():
    layer = toy_layer()
    step = ema_step(layer, TOY_BATCH, threshold=10.0, generator=torch.Generator().manual_seed(3))
    assert step.restarted == 3
    keys = sorted(tuple(k.tolist()) for k in layer.keys[0])
    assert keys == sorted(tuple(s.tolist()) for s in TOY_BATCH[:, 0])


@pytest.mark.parametrize("mode", ["reset", "upstream"])
def test_short_last_batch_restarts(mode):
    # every key is dead at every step; the last batch has 2 vectors, a full one 6
    g = torch.Generator().manual_seed(4)
    z = torch.randn(14, 2, generator=g)
    layer = KeyValueBottleneck(2, 1, 6, 2, 3, splitting_mode="chunk", threshold_factor=100.0)
    stats = layer.init_keys([z[:6], z[6:12], z[12:]], epochs=1, restart_mode=mode)
    assert stats.dead_at_end == 6
    distinct = {tuple(key.tolist()) for key in layer.keys[0]}
    samples = {tuple(v.tolist()) for v in z}
    assert distinct <= samples
    if mode == "reset":  # the 2 last vectors pooled with 4 of the previous batch: no duplicates
        assert len(distinct) == 6
        assert distinct <= {tuple(v.tolist()) for v in z[6:]}
    else:  # drawn from the last batch alone
        assert distinct <= {tuple(v.tolist()) for v in z[12:]}


def test_threshold_follows_batch_size_and_pairs():
    layer = small(threshold_factor=0.1)
    z = torch.randn(100, D)
    stats = layer.init_keys([z[:64], z[64:]], epochs=1, freeze=False)
    assert stats.threshold == pytest.approx(0.1 * 64 / J)
    assert stats.steps == 2 and len(stats.restarts_per_epoch) == 1
    assert not layer.frozen


def test_key_init_recovers_well_separated_cluster_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0], [0.0, 0.0]])
    labels = torch.randint(0, 5, (2000,), generator=g)
    z = centres[labels] + 0.05 * torch.randn(2000, 2, generator=g)
    layer = KeyValueBottleneck(2, 1, 8, 2, 5, splitting_mode="chunk", seed=0)
    stats = layer.init_keys([z[i:i + 100] for i in range(0, 2000, 100)], epochs=5)
    assert layer.frozen
    keys = layer.keys[0]
    nearest = torch.cdist(centres, keys).min(1).values
    assert (nearest < 0.05).all(), nearest
    # every key sits inside a cluster (restarted keys land on samples), none far away
    assert (torch.cdist(keys, centres).min(1).values < 0.3).all()
    assert stats.distortion_per_epoch[-1] < 0.01


def test_key_init_is_deterministic_and_refuses_iterators_and_frozen_layers():
    z = torch.randn(200, D, generator=torch.Generator().manual_seed(5))
    batches = [z[i:i + 64] for i in range(0, 200, 64)]  # last batch partial
    a, b = small(seed=3), small(seed=3)
    a.init_keys(batches, epochs=2)
    b.init_keys([(x, torch.zeros(len(x))) for x in batches], epochs=2)  # labels are ignored
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(RuntimeError, match="frozen"):
        a.init_keys(batches)
    with pytest.raises(TypeError, match="iterator"):
        small().init_keys(iter(batches))
    restored = small(seed=9)
    restored.load_state_dict(a.state_dict())
    assert restored.frozen


# ----------------------------------------------------------------------------- value training


def test_training_step_changes_exactly_the_fetched_value_rows():
    layer, z = frozen_layer(topk=2)
    with torch.no_grad():
        layer.values.copy_(torch.randn(C, J, V))
    before = layer.values.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.3)
    batch, labels = z[:16], torch.randint(0, V, (16,))
    layer.train()
    loss = F.cross_entropy(layer(batch), labels, label_smoothing=0.1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
    optimizer.step()
    fetched = torch.zeros(C, J, dtype=torch.bool)
    idx = layer.indices(batch)
    fetched[torch.arange(C).view(1, 1, C, 1).expand_as(idx), idx] = True
    changed = (layer.values.detach() != before).any(-1)
    assert torch.equal(changed, fetched)
    assert torch.equal(layer.values.detach()[~fetched], before[~fetched])  # bit-identical
    # the same through the cached sparse path
    before = layer.values.detach().clone()
    train_values(layer, idx, labels, epochs=1, batch_size=16, sparse=True)
    assert torch.equal((layer.values.detach() != before).any(-1), fetched)


def autograd_reference(layer: KeyValueBottleneck, z: torch.Tensor, labels: torch.Tensor, *,
                       epochs: int, lr: float, batch_size: int, clip: float, seed: int) -> None:
    """Training through ``layer(z)`` with torch's SGD and clipping, in ``epoch_order``."""
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    layer.train()
    for epoch in range(epochs):
        order = epoch_order(len(z), seed, epoch)
        for start in range(0, len(z), batch_size):
            sel = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(layer(z[sel]), labels[sel], label_smoothing=0.1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()


@pytest.mark.parametrize("lr, clip", [(0.3, 1.0), (50.0, 0.002)])  # clipping idle, then active
def test_cached_index_training_equals_autograd_training(lr, clip):
    reference, z = frozen_layer(topk=2)
    labels = torch.randint(0, V, (len(z),), generator=torch.Generator().manual_seed(7))
    autograd_reference(reference, z, labels, epochs=3, lr=lr, batch_size=48, clip=clip, seed=11)
    for sparse in (False, True):
        layer, _ = frozen_layer(topk=2)
        cached = cache_indices(layer, z)
        stats = train_values(layer, cached, labels, epochs=3, lr=lr, batch_size=48, clip=clip,
                             seed=11, sparse=sparse)
        assert stats.steps == 3 * math.ceil(len(z) / 48)
        assert (stats.clipped_steps == stats.steps) if clip < 0.01 else stats.clipped_steps == 0
        assert torch.allclose(layer.values, reference.values, rtol=0, atol=1e-6), sparse
        assert torch.equal(layer.usage, reference.usage)
        assert layer.values.detach().abs().max() > 1e-4


def test_cached_training_with_a_trainable_decoder_equals_autograd():
    reference, z = frozen_layer(decoder="linear-probe", train_decoder=True)
    labels = torch.randint(0, V, (len(z),), generator=torch.Generator().manual_seed(8))
    autograd_reference(reference, z, labels, epochs=2, lr=0.5, batch_size=64, clip=1.0, seed=2)
    layer, _ = frozen_layer(decoder="linear-probe", train_decoder=True)
    train_values(layer, cache_indices(layer, z), labels, epochs=2, lr=0.5, batch_size=64,
                 seed=2)
    for a, b in zip(layer.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sparse"):
        train_values(layer, cache_indices(layer, z), labels, sparse=True)


def test_training_needs_frozen_keys():
    layer = small()
    with pytest.raises(RuntimeError, match="frozen"):
        train_values(layer, torch.zeros(4, 1, C, 1, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_trained_values_are_a_count_vote():
    """Spec §10.3: zero-init values, plain SGD, mean over heads: each value is, to first order,
    a multiple of its pair's centred class histogram, and the prediction is the count vote."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    layer = KeyValueBottleneck(64, 32, 256, 8, 10, seed=0)
    layer.init_keys([x[train][i:i + 64] for i in range(0, 1200, 64)], epochs=3)
    cached = cache_indices(layer, x[train])
    flat = layer._flat(cached)[:, 0, :, 0]  # (N, C) rows of the value table
    # class-incremental: 5 tasks of 2 classes, 2 epochs each; the oracle replays the same
    # batches and adds onehot / batch size to every fetched pair's histogram
    hist = torch.zeros(32 * 256, 10)
    for task in range(5):
        rows = ((y[train] == 2 * task) | (y[train] == 2 * task + 1)).nonzero().squeeze(1)
        train_values(layer, cached[rows], y[train][rows], epochs=2, lr=0.3, batch_size=32,
                     seed=task, sparse=True)
        for epoch in range(2):
            order = rows[epoch_order(len(rows), task, epoch)]
            for batch in order.split(32):
                votes = F.one_hot(y[train][batch], 10).float() / len(batch)
                hist.index_add_(0, flat[batch].reshape(-1), votes.repeat_interleave(32, 0))
    centred = hist - hist.sum(1, keepdim=True) / 10
    values = layer.values.detach().view(-1, 10)
    corr = torch.corrcoef(torch.stack([values.flatten(), centred.flatten()]))[0, 1]
    assert corr > 0.999
    test_idx = cache_indices(layer, x[test])
    vote = hist[layer._flat(test_idx)[:, 0, :, 0]].sum(1).argmax(1)
    model = logits_from_cache(layer, test_idx).argmax(1)
    assert (vote == model).float().mean() >= 0.99
    assert (model == y[test]).float().mean() > 0.85
    assert layer.values.detach().abs().max() < 0.05  # logits stay tiny


def test_reset_values_state_dict_and_copies():
    import copy

    layer, z = frozen_layer()
    labels = torch.randint(0, V, (len(z),))
    train_values(layer, cache_indices(layer, z), labels, epochs=1, batch_size=64)
    assert layer.usage.any() and layer.values.detach().any()
    clone = copy.deepcopy(layer)
    assert clone._flat_cache is None or clone._flat_cache[0] is clone.projection
    layer.eval()
    clone.eval()
    assert torch.equal(clone(z), layer(z))
    other = small(seed=5)
    other.load_state_dict(layer.state_dict())  # P copied in place: the cached flat P follows
    other.eval()
    assert torch.equal(other(z), layer(z)) and other.frozen
    layer.reset_values()
    assert not layer.values.detach().any() and not layer.usage.any()
    layer.reset_values("randn", seed=1)
    assert torch.equal(layer.values.detach(), torch.randn(C, J, V, generator=torch.Generator().manual_seed(1)))


def test_double_precision_search_and_topk_ties():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    heads = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]], dtype=torch.float64)
    assert nearest_keys(heads, keys, 3).tolist() == [[[0, 1, 2], [0, 2, 1]]]
    assert nearest_keys(heads.float(), keys.float(), 3).tolist() == [[[0, 1, 2], [0, 2, 1]]]
