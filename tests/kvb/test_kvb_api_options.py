"""`narrows.kvb.embed` and `narrows.kvb.train_continual` take the options object the command
line uses as well as keywords, with the same defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from narrows.errors import UserError
from narrows.kvb import ContinualSettings, embed, train_continual
from narrows.kvb.embeddings import load_embeddings
from narrows.kvb.options import ContinualOptions, EmbedOptions

TINY = "shapes:classes=4,size=16,train=32,test=16"


def quiet(_: str) -> None:
    return None


def test_every_keyword_default_equals_the_options_default():
    defaults = {p.name: p.default for p in inspect.signature(embed).parameters.values()}
    for field in dataclasses.fields(EmbedOptions):
        name = "splits" if field.name == "split" else field.name
        want = getattr(EmbedOptions(), field.name)
        have = defaults[name]
        assert (list(have) if isinstance(want, list) else have) == want, field.name
    for field in dataclasses.fields(ContinualOptions):
        assert getattr(ContinualSettings(), field.name) == getattr(ContinualOptions(), field.name)
    assert inspect.signature(train_continual).parameters["options"].default is None


def test_the_options_form_gives_the_keyword_form_s_result(random_checkpoint, tmp_path):
    checkpoint = random_checkpoint(TINY)
    by_keywords = embed(checkpoint, data=TINY, batch_size=8, out=tmp_path / "a", say=quiet)
    by_options = embed(options=EmbedOptions(checkpoint=checkpoint, data=TINY, batch_size=8),
                       out=tmp_path / "b", say=quiet)
    assert sorted(by_options) == sorted(by_keywords) == ["test", "train"]
    for split in by_keywords:
        a, b = load_embeddings(by_keywords[split]), load_embeddings(by_options[split])
        assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
        assert a.meta == b.meta

    keywords = {"model": ["linear"], "protocol": ["iid"], "epochs": 2, "batch_size": 8}
    plain = train_continual(tmp_path / "a", say=quiet, **keywords)
    given = train_continual(tmp_path / "a", options=ContinualOptions(**keywords), say=quiet)
    assert given.settings == plain.settings
    assert [r.to_rows() for r in given.results] == [r.to_rows() for r in plain.results]
    # a keyword still changes what the options object says
    one_epoch = train_continual(tmp_path / "a", options=ContinualOptions(**keywords), epochs=1,
                                say=quiet)
    assert one_epoch.settings.epochs == 1
    with pytest.raises(UserError, match="both `settings` and `options`"):
        train_continual(tmp_path / "a", ContinualSettings(), options=ContinualOptions())
