"""The 2-D toy experiment of the paper's Figure 2: class-incremental learning of 8 Gaussian classes.

Eight isotropic Gaussian classes (σ = 0.035) in the unit square arrive in four stages of two
classes. Each model is trained stage by stage on the stage's points only (one full batch, a fixed
number of steps per stage, plain cross-entropy over all 8 outputs) and evaluated after every stage
on test points of every class. A linear probe and an MLP re-colour the plane with the newest
classes; key-value bottlenecks keep the regions of earlier classes, because a step changes only
the values the current points fetch.

Everything is seeded: one seed gives the data, the key-fitting points and every initialisation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.kvb.registry import TOY_MODELS, ToyModel
from narrows.runtime import derive_seed

CENTRES: tuple[tuple[float, float], ...] = (
    (0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75),
    (0.75, 0.50), (0.50, 0.75), (0.25, 0.50), (0.50, 0.25),
)
"""Class means (class c at ``CENTRES[c]``)."""
STAGES: tuple[tuple[int, int], ...] = ((0, 4), (1, 5), (2, 6), (3, 7))
"""The classes of each stage, in order of arrival."""
SIGMA = 0.035
SEED_FORMAT_KIND = "kvb.toy-seed"  # the "format" of a saved SeedResult: narrows.kvb.toy-seed/1
NUM_CLASSES = 8

# derive_seed tags: one independent stream per purpose
_TRAIN, _TEST, _KEYS, _INIT, _LAYER = 1, 2, 3, 4, 5


# -- data -------------------------------------------------------------------------------------
def sample_stage(stage: int, n: int, generator: torch.Generator,
                 sigma: float = SIGMA) -> tuple[Tensor, Tensor]:
    """``n`` points of ``stage`` (0-based): each point's class by a fair coin between the stage's
    two classes, then a draw from that class's Gaussian. Returns ``(x (n, 2) float32, y (n,))``."""
    pair = torch.tensor(STAGES[stage])
    y = pair[torch.randint(0, 2, (n,), generator=generator)]
    centres = torch.tensor(CENTRES, dtype=torch.float32)
    x = centres[y] + sigma * torch.randn(n, 2, generator=generator)
    return x, y


@dataclass
class ToyData:
    """Training and test points of every stage."""

    train: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]

    def test_all(self) -> tuple[Tensor, Tensor]:
        """All stages' test points, concatenated."""
        return torch.cat([x for x, _ in self.test]), torch.cat([y for _, y in self.test])


def make_data(seed: int, train_points: int = 100, test_points: int = 1000,
              sigma: float = SIGMA) -> ToyData:
    """The seeded data of one repetition (training and test points from separate streams)."""
    train_gen = torch.Generator().manual_seed(derive_seed(seed, _TRAIN))
    test_gen = torch.Generator().manual_seed(derive_seed(seed, _TEST))
    return ToyData(
        train=[sample_stage(s, train_points, train_gen, sigma) for s in range(len(STAGES))],
        test=[sample_stage(s, test_points, test_gen, sigma) for s in range(len(STAGES))])


def key_batches(seed: int, batches: int = 1000, batch_size: int = 100) -> list[Tensor]:
    """Unlabelled key-fitting points: ``batches`` batches drawn uniformly from [0, 1]²."""
    gen = torch.Generator().manual_seed(derive_seed(seed, _KEYS))
    return list(torch.rand(batches, batch_size, 2, generator=gen).unbind(0))


def grid_points(resolution: int = 100) -> Tensor:
    """``resolution²`` evenly spaced points of [0, 1]², row-major with y as the row."""
    axis = torch.linspace(0.0, 1.0, resolution)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


# -- models -----------------------------------------------------------------------------------
MODELS: dict[str, ToyModel] = TOY_MODELS
"""Every model, by name (:data:`narrows.kvb.registry.TOY_MODELS`)."""


def build_kv_layer(books: int, pairs: int, splitting: str, seed: int, decay: float = 0.95) -> Any:
    """A key-value bottleneck of the toy: 2-D inputs, key dim 2, 8 classes, the voting decoder,
    no dead-code restarts (threshold 0)."""
    from narrows.kvb.layer import KeyValueBottleneck

    return KeyValueBottleneck(2, books, pairs, 2, NUM_CLASSES, topk=1, splitting_mode=splitting,
                              decoder="codebook-voting-logits", num_classes=NUM_CLASSES,
                              decay=decay, eps=1e-5, threshold_factor=0.0, seed=seed)


def fit_kv_layer(books: int, pairs: int, splitting: str, seed: int, *, batches: int = 1000,
                 batch_size: int = 100, decay: float = 0.95) -> Any:
    """A toy layer with keys fitted (one pass of EMA k-means over ``batches`` uniform batches)
    and frozen."""
    layer = build_kv_layer(books, pairs, splitting, derive_seed(seed, _LAYER, books, pairs),
                           decay)
    layer.init_keys(key_batches(seed, batches, batch_size), epochs=1)
    return layer


class Learner:
    """One seed's model, trained stage by stage.

    Training runs the same model of several seeds in lockstep (:func:`train_stage`): each
    learner exports its trainable tensors, the seeds' tensors are stacked and one batched step
    updates them all. Adam and SGD act element by element and the loss is the sum of the seeds'
    mean losses, so each seed gets exactly its own update: this only saves per-step overhead.
    """

    spec: ToyModel
    prunable = False

    def tensors(self) -> list[Tensor]:
        """The trainable tensors, in the layout :meth:`stacked_logits` reads."""
        raise NotImplementedError

    def load(self, tensors: Sequence[Tensor]) -> None:
        """Write trained tensors (as from :meth:`tensors`) back into the model."""
        raise NotImplementedError

    def stage_input(self, x: Tensor) -> Tensor:
        """What the training steps of a stage on inputs ``x`` read (computed once per stage)."""
        return x

    def stacked_logits(self, params: Sequence[Tensor], inputs: Tensor) -> Tensor:
        """Logits ``(S, B, K)`` of S seeds' stacked tensors ``(S, ...)`` on their stacked stage
        inputs ``(S, B, ...)``."""
        raise NotImplementedError

    def logits(self, x: Tensor, prune: bool = True) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: Tensor, prune: bool = True) -> Tensor:
        return self.logits(x, prune).argmax(dim=1)

    def used_fraction(self) -> float | None:
        return None


class NetLearner(Learner):
    """A linear probe or an MLP 2-32-8 (PyTorch's default initialisation, seeded); the VQ
    model's decoder (``quantiser`` given: inputs are first snapped to their nearest key)."""

    def __init__(self, spec: ToyModel, seed: int, quantiser: Any = None) -> None:
        self.spec, self.quantiser = spec, quantiser
        torch.manual_seed(derive_seed(seed, _INIT, ("linear", "mlp", "vq-mlp").index(spec.kind)))
        self.net = (nn.Linear(2, NUM_CLASSES) if spec.kind == "linear" else
                    nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)))
        self.linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]

    def tensors(self) -> list[Tensor]:
        out = []
        for linear in self.linears:
            out += [linear.weight.detach().t().contiguous(), linear.bias.detach().unsqueeze(0)]
        return out

    @torch.no_grad()
    def load(self, tensors: Sequence[Tensor]) -> None:
        for i, linear in enumerate(self.linears):
            linear.weight.copy_(tensors[2 * i].t())
            linear.bias.copy_(tensors[2 * i + 1][0])

    @torch.no_grad()
    def quantise(self, x: Tensor) -> Tensor:
        """Each point replaced by its nearest key (one codebook, identity heads)."""
        idx = self.quantiser.indices(x)[:, 0, 0, 0]
        return self.quantiser.keys[0, idx]

    def stage_input(self, x: Tensor) -> Tensor:
        return x if self.quantiser is None else self.quantise(x)

    def stacked_logits(self, params: Sequence[Tensor], inputs: Tensor) -> Tensor:
        h = inputs
        for i in range(0, len(params), 2):
            if i:
                h = h.relu()
            h = torch.baddbmm(params[i + 1], h, params[i])
        return h

    def logits(self, x: Tensor, prune: bool = True) -> Tensor:
        return self.net(self.stage_input(x))


class KVLearner(Learner):
    """A key-value bottleneck with frozen keys; only the values train (values start at
    0.001·N(0, 1), as the authors' notebook)."""

    prunable = True

    def __init__(self, spec: ToyModel, seed: int, layer: Any) -> None:
        self.spec, self.layer = spec, layer
        gen = torch.Generator().manual_seed(derive_seed(seed, _INIT, 3, spec.books, spec.pairs))
        with torch.no_grad():
            layer.values.copy_(1e-3 * torch.randn(layer.values.shape, generator=gen))

    def tensors(self) -> list[Tensor]:
        return [self.layer.values.detach().reshape(-1, self.layer.dim_value).clone()]

    @torch.no_grad()
    def load(self, tensors: Sequence[Tensor]) -> None:
        self.layer.values.copy_(tensors[0].view_as(self.layer.values))

    def stage_input(self, x: Tensor) -> Tensor:
        """Rows of the stage's fetched values in the flattened value table ``(C·J, V)``; the
        fetches are counted once (usage decides pruning). The keys are frozen, so the fetched
        pairs never change and the search runs once per stage, not once per step."""
        idx = self.layer.indices(x)  # (B, n, C, t)
        self.layer.count_usage(idx)
        offsets = torch.arange(self.layer.num_codebooks) * self.layer.num_pairs
        return idx + offsets.view(1, 1, -1, 1)

    def stacked_logits(self, params: Sequence[Tensor], inputs: Tensor) -> Tensor:
        seeds, rows, _ = params[0].shape
        offsets = (torch.arange(seeds) * rows).view(seeds, *([1] * (inputs.dim() - 1)))
        fetched = nn.functional.embedding(inputs + offsets, params[0].reshape(seeds * rows, -1))
        logits = self.layer.decode(fetched.flatten(0, 1))  # the layer's own decoder
        return logits.view(seeds, -1, logits.shape[-1])

    def logits(self, x: Tensor, prune: bool = True) -> Tensor:
        self.layer.eval()  # nothing is counted in eval mode
        with torch.no_grad():
            return self.layer(x, prune=prune and self.used_fraction() > 0)

    def used_fraction(self) -> float:
        return float((self.layer.usage > 0).float().mean())


def make_learners(name: str, seeds: Sequence[int], *, key_batches_count: int = 1000,
                  key_batch_size: int = 100, decay: float = 0.95,
                  kv_lr: float | None = None,
                  layers: dict[tuple[int, int, int, str], Any] | None = None) -> list[Learner]:
    """The learners of model ``name`` for each seed. Fitted key layers are cached in ``layers``
    (by seed and layout), so models with the same layout share the keys (each gets a copy)."""
    spec = MODELS[name]
    if spec.kind == "kv" and kv_lr is not None and kv_lr != spec.lr:
        spec = ToyModel(**{**spec.__dict__, "lr": kv_lr,
                           "label": spec.label.replace(f"{spec.lr:g}", f"{kv_lr:g}")})
    layers = {} if layers is None else layers
    learners: list[Learner] = []
    for seed in seeds:
        if spec.kind in ("linear", "mlp"):
            learners.append(NetLearner(spec, seed))
            continue
        key = (seed, *spec.key_layout)
        if key not in layers:
            layers[key] = fit_kv_layer(*spec.key_layout, seed, batches=key_batches_count,
                                       batch_size=key_batch_size, decay=decay)
        layer = copy.deepcopy(layers[key])
        learners.append(NetLearner(spec, seed, layer) if spec.kind == "vq-mlp"
                        else KVLearner(spec, seed, layer))
    return learners


class LockstepTrainer:
    """Trains one model's learners (one per seed) together, stage by stage.

    The optimiser is created at every stage (``fresh_optimizer``: the linear probe and the MLP)
    or once (the KV values: Adam's state carries over, as in the authors' notebook).
    """

    def __init__(self, learners: Sequence[Learner]) -> None:
        self.learners = list(learners)
        self.spec = self.learners[0].spec
        exported = [learner.tensors() for learner in self.learners]
        self.params = [torch.stack([e[i] for e in exported]).requires_grad_(True)
                       for i in range(len(exported[0]))]
        self.optimizer: torch.optim.Optimizer | None = None

    def _new_optimizer(self) -> torch.optim.Optimizer:
        if self.spec.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=self.spec.lr)
        return torch.optim.Adam(self.params, lr=self.spec.lr, fused=True)

    def train_stage(self, xs: Sequence[Tensor], ys: Sequence[Tensor], steps: int) -> None:
        """``steps`` full-batch steps of cross-entropy, each seed on its own stage points."""
        if self.optimizer is None or self.spec.fresh_optimizer:
            self.optimizer = self._new_optimizer()
        inputs = torch.stack([lr.stage_input(x) for lr, x in zip(self.learners, xs, strict=True)])
        target = torch.stack(list(ys)).reshape(-1)
        per_seed = target.numel() // len(self.learners)
        model = self.learners[0]
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            logits = model.stacked_logits(self.params, inputs)
            loss = nn.functional.cross_entropy(logits.reshape(target.numel(), -1), target,
                                               reduction="sum") / per_seed
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            for s, learner in enumerate(self.learners):
                learner.load([p[s] for p in self.params])


# -- the experiment ---------------------------------------------------------------------------
def per_class_accuracy(pred: Tensor, y: Tensor) -> list[float]:
    """Accuracy on each of the 8 classes (NaN for a class without test points)."""
    out = []
    for c in range(NUM_CLASSES):
        mask = y == c
        out.append(float((pred[mask] == c).float().mean()) if mask.any() else math.nan)
    return out


@dataclass
class Evaluation:
    """One model evaluated in one way (pruned or not) after initialisation and every stage."""

    model: str
    label: str
    prune: bool | None  # None: the model has nothing to prune
    per_class: list[list[float]] = field(default_factory=list)  # [after 0..4][class]
    used: list[float | None] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.model if self.prune in (None, True) else f"{self.model}/no-prune"

    @property
    def row_label(self) -> str:
        if self.prune is None:
            return self.label
        return f"{self.label}, {'pruning' if self.prune else 'no pruning'}"

    def task_accuracy(self, after: int, stage: int) -> float:
        """Mean per-class accuracy over ``stage``'s classes after stage ``after`` (0 = init)."""
        return sum(self.per_class[after][c] for c in STAGES[stage]) / len(STAGES[stage])

    def final(self) -> float:
        """Class-balanced accuracy on all 8 classes after the last stage."""
        return sum(self.per_class[-1]) / NUM_CLASSES

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "label": self.label, "prune": self.prune,
                "per_class": self.per_class, "used": self.used}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        return cls(**data)


@dataclass
class SeedResult:
    """Everything one seed produced: evaluations, and decision maps per model and moment."""

    seed: int
    evaluations: list[Evaluation]
    maps: dict[str, Tensor]  # model -> uint8 (5, resolution, resolution): init, after D1..D4
    seconds: float = 0.0  # wall time of the run divided by its number of seeds

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "seconds": self.seconds,
                "evaluations": [e.to_dict() for e in self.evaluations]}

    def document(self) -> dict[str, Any]:
        """What :meth:`save` writes as JSON: the header, then :meth:`to_dict`."""
        from narrows.runs.results import header, provenance

        origin = provenance(data="toy", seed=self.seed,
                            options={"models": [e.key for e in self.evaluations]})
        return {**header(SEED_FORMAT_KIND, 1, origin), **self.to_dict()}

    def save(self, path: Any) -> Any:
        """Write ``path`` (JSON, with the header) and the decision maps next to it
        (``<stem>_maps.pt``); returns ``path``."""
        from pathlib import Path

        from narrows.runs.files import atomic_torch_save, atomic_write_json

        path = Path(path)
        atomic_torch_save(path.with_name(f"{path.stem}_maps.pt"), self.maps)
        return atomic_write_json(path, self.document())

    @classmethod
    def load(cls, path: Any) -> SeedResult:
        """A result written by :meth:`save` (or a run's ``seeds/seed<N>.json``)."""
        from pathlib import Path

        from narrows.kvb.toy_run import load_seed
        from narrows.runs import RunDir
        from narrows.runs.files import read_json_file
        from narrows.runs.results import check_header

        path = Path(path)
        check_header(read_json_file(path, "per-seed result", kind=dict), SEED_FORMAT_KIND, 1,
                     str(path))
        return load_seed(RunDir(path.parent, writer=False), path.stem)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per model, pruning and moment (as toy.csv)."""
        return csv_rows([self])

    def summary(self) -> str:
        """One line: the seed and each model's final 8-class accuracy."""
        return f"seed {self.seed}: final accuracy " + ", ".join(
            f"{e.key} {e.final():.3f}" for e in self.evaluations)

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """Each model's final 8-class accuracy as bars, on ``ax`` or a new figure."""
        from narrows.plotting import pyplot

        if ax is None:
            _, ax = pyplot().subplots(figsize=(5, 3))
        keys = [e.key for e in self.evaluations]
        ax.bar(range(len(keys)), [e.final() for e in self.evaluations])
        ax.set_xticks(range(len(keys)), keys, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("final accuracy, 8 classes")
        ax.set_title(f"toy, seed {self.seed}", fontsize=9)
        return ax.figure, ax


def run_seeds(seeds: Sequence[int], models: Sequence[str] = tuple(MODELS), *,
              steps: int = 1000, train_points: int = 100, test_points: int = 1000,
              key_batches_count: int = 1000, key_batch_size: int = 100, decay: float = 0.95,
              kv_lr: float | None = None, resolution: int = 100, sigma: float = SIGMA,
              threads: int | None = 1) -> list[SeedResult]:
    """Train every model of ``models`` through the four stages for each seed (the seeds of a
    model in lockstep) and evaluate after initialisation and after every stage.

    ``threads``: torch threads during the run, restored afterwards (default 1: the tensors are
    tiny, and more threads only add synchronisation, badly so on a busy machine); ``None``
    leaves the setting alone.
    """
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise UserError(f"unknown toy model {unknown[0]!r}", f"choose from {', '.join(MODELS)}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_seeds(list(seeds), models, steps=steps, train_points=train_points,
                          test_points=test_points, key_batches_count=key_batches_count,
                          key_batch_size=key_batch_size, decay=decay, kv_lr=kv_lr,
                          resolution=resolution, sigma=sigma)
    finally:
        torch.set_num_threads(before)


def _run_seeds(seeds: list[int], models: Sequence[str], *, steps: int, train_points: int,
               test_points: int, key_batches_count: int, key_batch_size: int, decay: float,
               kv_lr: float | None, resolution: int, sigma: float) -> list[SeedResult]:
    import time

    began = time.perf_counter()
    data = [make_data(seed, train_points, test_points, sigma) for seed in seeds]
    tests = [d.test_all() for d in data]
    grid = grid_points(resolution)
    evaluations: list[list[Evaluation]] = [[] for _ in seeds]
    maps: list[dict[str, Tensor]] = [{} for _ in seeds]
    layers: dict[tuple[int, int, int, str], Any] = {}
    for name in models:
        learners = make_learners(name, seeds, key_batches_count=key_batches_count,
                                 key_batch_size=key_batch_size, decay=decay, kv_lr=kv_lr,
                                 layers=layers)
        spec = learners[0].spec
        modes: list[bool | None] = [True, False] if learners[0].prunable else [None]
        evals = [[Evaluation(spec.name, spec.label, mode) for mode in modes] for _ in seeds]
        frames: list[list[Tensor]] = [[] for _ in seeds]

        _record(learners, evals, frames, tests, grid, resolution)
        trainer = LockstepTrainer(learners)
        for stage in range(len(STAGES)):
            trainer.train_stage([d.train[stage][0] for d in data],
                                [d.train[stage][1] for d in data], steps)
            _record(learners, evals, frames, tests, grid, resolution)
        for s in range(len(seeds)):
            evaluations[s].extend(evals[s])
            maps[s][spec.name] = torch.stack(frames[s])
    seconds = (time.perf_counter() - began) / max(1, len(seeds))
    return [SeedResult(seed, evaluations[s], maps[s], seconds) for s, seed in enumerate(seeds)]


def _record(learners: Sequence[Learner], evals: list[list[Evaluation]],
            frames: list[list[Tensor]], tests: Sequence[tuple[Tensor, Tensor]], grid: Tensor,
            resolution: int) -> None:
    """Evaluate each seed's learner on its test points (each evaluation mode) and its decision
    map on the grid."""
    for s, learner in enumerate(learners):
        x_test, y_test = tests[s]
        for ev in evals[s]:
            ev.per_class.append(per_class_accuracy(
                learner.predict(x_test, prune=ev.prune is not False), y_test))
            ev.used.append(learner.used_fraction())
        frames[s].append(learner.predict(grid).to(torch.uint8).reshape(resolution, resolution))


# -- summaries --------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(results: Sequence[SeedResult]) -> dict[str, dict[str, Any]]:
    """Per evaluation (model, pruning): final 8-class accuracy (mean, std over seeds), task-1
    accuracy right after stage 1 and at the end, per-class accuracy at the end, the accuracy
    matrix (after stage i on task j) and the fraction of pairs used, all averaged over seeds."""
    by_key: dict[str, list[Evaluation]] = {}
    for result in results:
        for ev in result.evaluations:
            by_key.setdefault(ev.key, []).append(ev)
    summary: dict[str, dict[str, Any]] = {}
    stages = len(STAGES)
    for key, evs in by_key.items():
        finals = [e.final() for e in evs]
        mean, std = _mean_std(finals)
        used = [e.used[-1] for e in evs if e.used[-1] is not None]
        summary[key] = {
            "label": evs[0].row_label,
            "final_mean": mean, "final_std": std,
            "task1_after1": _mean_std([e.task_accuracy(1, 0) for e in evs])[0],
            "task1_end": _mean_std([e.task_accuracy(stages, 0) for e in evs])[0],
            "per_class_end": [_mean_std([e.per_class[-1][c] for e in evs])[0]
                              for c in range(NUM_CLASSES)],
            "matrix": [[_mean_std([e.task_accuracy(i, j) for e in evs])[0]
                        for j in range(stages)] for i in range(1, stages + 1)],
            "used": _mean_std(used)[0] if used else None,
            "seeds": len(evs),
        }
    return summary


def csv_rows(results: Sequence[SeedResult]) -> list[dict[str, Any]]:
    """One row per (model, pruning, seed, moment): per-class and per-task accuracies."""
    rows = []
    for result in results:
        for ev in result.evaluations:
            for after in range(len(ev.per_class)):
                row: dict[str, Any] = {"model": ev.key, "seed": result.seed, "after_stage": after}
                row.update({f"class_{c}": ev.per_class[after][c] for c in range(NUM_CLASSES)})
                row.update({f"task_{s + 1}": ev.task_accuracy(after, s)
                            for s in range(len(STAGES))})
                row["all_classes"] = sum(ev.per_class[after]) / NUM_CLASSES
                row["pairs_used"] = ev.used[after]
                rows.append(row)
    return rows


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: final accuracy, task 1 after stage 1 → end, per class at the end, pairs used."""
    head = ("| model | final acc, 8 classes | task 1: after stage 1 → end | "
            + " | ".join(f"class {c}" for c in range(NUM_CLASSES)) + " | pairs used |")
    lines = [head, "|" + "---|" * (NUM_CLASSES + 4)]
    for s in summary.values():
        used = "—" if s["used"] is None else f"{100 * s['used']:.1f} %"
        lines.append(f"| {s['label']} | {s['final_mean']:.3f} ± {s['final_std']:.3f} | "
                     f"{s['task1_after1']:.3f} → {s['task1_end']:.3f} | "
                     + " | ".join(f"{v:.2f}" for v in s["per_class_end"]) + f" | {used} |")
    return "\n".join(lines)


def matrix_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: per model, accuracy on each task after each stage (mean over seeds)."""
    stages = len(STAGES)
    lines = ["| model | after stage | " + " | ".join(
        f"task {j + 1} ({', '.join(map(str, STAGES[j]))})" for j in range(stages)) + " |",
             "|" + "---|" * (stages + 2)]
    for s in summary.values():
        for i, row in enumerate(s["matrix"], 1):
            lines.append(f"| {s['label'] if i == 1 else ''} | {i} | "
                         + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


# -- figure -----------------------------------------------------------------------------------
PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
           "#666666")


def decision_figure(maps: dict[str, Tensor], data: ToyData, labels: dict[str, str]) -> Any:
    """Rows = models, columns = after init, after D1…D4, final (all stages' points)."""
    from matplotlib.colors import ListedColormap

    from narrows.plotting import pyplot

    plt = pyplot()
    cmap = ListedColormap(PALETTE)
    names = list(maps)
    stages = len(STAGES)
    cols = stages + 2
    fig, axes = plt.subplots(len(names), cols, figsize=(2.1 * cols, 2.1 * len(names)),
                             squeeze=False)
    titles = ["after init"] + [f"after D{s + 1}" for s in range(stages)] + ["final"]
    for r, name in enumerate(names):
        frames = maps[name]
        for c in range(cols):
            ax = axes[r][c]
            frame = frames[min(c, stages)]
            ax.imshow(frame.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap=cmap,
                      vmin=-0.5, vmax=NUM_CLASSES - 0.5, interpolation="nearest", alpha=0.55)
            shown = range(stages) if c == cols - 1 else ([c - 1] if 1 <= c <= stages else [])
            for s in shown:
                x, y = data.train[s]
                ax.scatter(x[:, 0], x[:, 1], c=[PALETTE[int(v)] for v in y], s=6,
                           edgecolors="black", linewidths=0.3)
            ax.set_xlim(0.05, 0.95)
            ax.set_ylim(0.05, 0.95)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(labels.get(name, name), fontsize=7)
    fig.tight_layout()
    return fig
