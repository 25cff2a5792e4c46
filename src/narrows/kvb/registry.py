"""The models of kvb by name (no torch import here: the command line reads its choices from it).

* :data:`LEARNERS`: the models ``train_continual`` (``narrows kvb train``) trains on stored
  embeddings: the key-value bottleneck and its baselines; :func:`narrows.kvb.learners.make_learner`
  builds one.
* :data:`TOY_MODELS`: the models of the 2-D toy experiment (:mod:`narrows.kvb.toy`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LearnerSpec:
    """A model of the class-incremental protocols."""

    name: str
    summary: str
    uses_keys: bool = False  # needs the key-value layer whose keys were fitted on embeddings


LEARNERS: dict[str, LearnerSpec] = {s.name: s for s in (
    LearnerSpec("dkvb", "discrete key-value bottleneck: frozen keys, values trained by plain SGD",
                uses_keys=True),
    LearnerSpec("linear", "linear probe"),
    LearnerSpec("lp-no-bias", "linear probe without a bias"),
    LearnerSpec("mlp", "MLP probe with one hidden layer"),
    LearnerSpec("ridge", "linear probe with weight decay"),
    LearnerSpec("ridge-mlp", "MLP probe with weight decay"),
    LearnerSpec("vq", "VQ bottleneck with the DKVB's keys and a trainable decoder",
                uses_keys=True),
)}
"""Every model of the protocols, by name."""
MODEL_NAMES: tuple[str, ...] = tuple(LEARNERS)


@dataclass(frozen=True)
class ToyModel:
    """One model of the toy experiment (the authors' settings unless noted)."""

    name: str
    label: str
    kind: str  # "linear", "mlp", "vq-mlp" or "kv"
    optimizer: str = "adam"  # "adam" or "sgd"
    lr: float = 1e-3
    fresh_optimizer: bool = True  # a new optimiser at every stage (LP, MLP)
    books: int = 1
    pairs: int = 400
    splitting: str = "chunk"

    @property
    def key_layout(self) -> tuple[int, int, str]:
        """Models with the same layout share fitted keys within a seed."""
        return self.books, self.pairs, self.splitting


TOY_MODELS: dict[str, ToyModel] = {m.name: m for m in (
    ToyModel("linear", "Linear probe (Adam 1e-2)", "linear", lr=1e-2),
    ToyModel("mlp", "MLP 2-32-8 (Adam 1e-3)", "mlp"),
    ToyModel("vq-mlp", "VQ 1×400 + MLP decoder (Adam 1e-3)", "vq-mlp"),
    ToyModel("kv-1x400", "KV 1×400 (Adam 1e-3)", "kv", fresh_optimizer=False),
    ToyModel("kv-1x400-sgd", "KV 1×400 (SGD 1e-3)", "kv", optimizer="sgd",
             fresh_optimizer=False),
    ToyModel("kv-20x20", "KV 20×20 random proj. (Adam 1e-3)", "kv", fresh_optimizer=False,
             books=20, pairs=20, splitting="random_projection"),
)}
"""Every model of the toy experiment, by name."""
TOY_MODEL_NAMES: tuple[str, ...] = tuple(TOY_MODELS)
