"""The core's resumable pass over a data set (narrows.data.streaming)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from narrows.data.streaming import Streaming, stream_dataset


class Sums:
    """A state: per-label sums of the images seen, and the labels in the order seen."""

    def __init__(self, width: int = 3) -> None:
        self.sums = torch.zeros(4, width, dtype=torch.float64)
        self.order = torch.empty(0, dtype=torch.long)

    def step(self, images, labels):
        self.sums.index_add_(0, labels, images.double())
        self.order = torch.cat([self.order, labels])

    def state_dict(self):
        return {"sums": self.sums, "order": self.order}

    def load_state_dict(self, state):
        if state["sums"].shape != self.sums.shape:
            raise ValueError("other width")
        self.sums, self.order = state["sums"].clone(), state["order"].clone()


def data(n: int = 23, width: int = 3) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, width, generator=gen), torch.arange(n) % 4)


def killed_after(batches: int, state: Sums, how: Streaming, **kw) -> None:
    calls = {"n": 0}

    def step(images, labels):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        state.step(images, labels)

    with pytest.raises(KeyboardInterrupt):
        stream_dataset(data(), step, state, how, **kw)


def test_a_killed_pass_resumes_after_the_saved_batches_and_equals_one_pass(tmp_path):
    whole = Sums()
    assert stream_dataset(data(), whole.step, whole, Streaming(batch_size=5, progress=False)) == 23
    how = Streaming(batch_size=5, progress=False, resume=tmp_path / "p.pt", save_every=2)
    killed_after(3, Sums(), how)  # saved after batch 2 (10 images), killed in batch 4
    resumed, seen = Sums(), []

    def step(images, labels):
        seen.append(len(labels))
        resumed.step(images, labels)

    assert stream_dataset(data(), step, resumed, how) == 23
    assert seen == [5, 5, 3]  # only what the saved state lacked
    assert torch.equal(resumed.order, whole.order) and torch.allclose(resumed.sums, whole.sums)
    assert not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize("change", ["key", "batch_size", "damaged", "other_state"])
def test_a_partial_file_that_does_not_match_starts_the_pass_over(tmp_path, change):
    partial = tmp_path / "p.pt"
    how = Streaming(batch_size=5, progress=False, resume=partial, save_every=1)
    killed_after(2, Sums(), how, key={"model": "a"})
    assert partial.is_file()
    key, state = {"model": "a"}, Sums()
    if change == "key":
        key = {"model": "b"}
    elif change == "batch_size":
        how = Streaming(batch_size=4, progress=False, resume=partial)
    elif change == "damaged":
        partial.write_bytes(b"not a torch file")
    else:
        state = Sums(width=5)
    seen = []
    dataset = data(width=5) if change == "other_state" else data()

    def step(images, labels):
        seen.append(len(labels))
        state.step(images, labels)

    stream_dataset(dataset, step, state, how, key=key)
    assert sum(seen) == 23 and len(state.order) == 23


def test_say_reports_the_work_and_an_empty_set_passes_nothing(tmp_path):
    lines = []
    state = Sums()
    stream_dataset(data(), state.step, state, Streaming(batch_size=5, progress=False,
                                                        say=lines.append), desc="count")
    assert lines[0].startswith("count: 23 images to go, 5 batches of 5")
    assert "images/s" in lines[1]
    empty = TensorDataset(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    assert stream_dataset(empty, state.step, state, Streaming(progress=False)) == 0


def test_collected_keeps_named_parts_resumes_and_refuses_mismatched_state(tmp_path):
    from narrows.data.streaming import Collected

    how = Streaming(batch_size=5, progress=False, resume=tmp_path / "p.pt", save_every=1)
    state = Collected()

    def step(images, labels):
        state.add({"x": images, "double": 2 * images}, labels)

    stream_dataset(data(), step, state, how)
    parts, labels = state.joined()
    whole = data()
    assert torch.equal(parts["x"], whole.tensors[0]) and torch.equal(labels, whole.tensors[1])
    assert torch.equal(parts["double"], 2 * whole.tensors[0])
    again = Collected()
    again.load_state_dict(state.state_dict())
    assert torch.equal(again.joined()[0]["x"], parts["x"])
    with pytest.raises(ValueError):
        again.load_state_dict({"parts": {"x": parts["x"][:3]}, "labels": labels})
