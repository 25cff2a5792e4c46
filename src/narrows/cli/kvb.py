"""``narrows kvb embed | train``: frozen-backbone embeddings and the class-incremental protocols."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from narrows.cli.app import GROUPS, Command, register
from narrows.cli.common import CommonOptions, open_run, start
from narrows.config import distinct, non_negative, not_empty, option, positive, unit_open

GROUPS["kvb"] = ("discrete key-value bottleneck: frozen-backbone embeddings, class-incremental "
                 "protocols against linear/MLP/ridge/VQ baselines, the 2-D toy, sweeps")
MODEL_NAMES = ("dkvb", "linear", "lp-no-bias", "mlp", "ridge", "ridge-mlp", "vq")
DEFAULT_EMBEDDINGS = "embeddings"


@dataclass
class EmbedConfig(CommonOptions):
    checkpoint: str | None = option(None, "the frozen backbone's weights; a narrows checkpoint "
                                    "carries its architecture, normalisation and data (also "
                                    "accepted as --backbone, its former name)", metavar="FILE",
                                    short="--backbone")
    model: str | None = option(None, "architecture (timm name): of a checkpoint without a "
                               "narrows card, or without --checkpoint a backbone with random "
                               "initial weights from --seed (nothing is downloaded)", short="-m")
    data: str | None = option(None, "data spec [default: the checkpoint's data]", short="-d")
    split: list[Literal["train", "test"]] = option(["train", "test"], "splits to embed")
    image_size: int | None = option(None, "served image size for imagenet:/folder: data",
                                    check=positive)
    resize: int | None = option(None, "resize images to N×N before the backbone (e.g. 224 for "
                                "ImageNet backbones on 32-px data)", check=positive)
    normalize: Literal["auto", "data", "imagenet"] = option(
        "auto", "input normalisation: auto = the checkpoint card's, else the data's")
    batch_size: int = option(256, "images per forward pass", check=positive,
                             affects_result=False)
    workers: int = option(0, "data-loading worker processes", check=non_negative,
                          affects_result=False)
    save_every: int = option(50, "save a partial file every N batches (a killed run resumes "
                             "there)", check=positive, affects_result=False)


@dataclass
class TrainConfig(CommonOptions):
    embeddings: str = option(DEFAULT_EMBEDDINGS, "directory of 'narrows kvb embed' files",
                             metavar="DIR")
    data: str | None = option(None, "the task's data spec (its train and test embeddings) "
                              "[default: the only data set with both splits in --embeddings]",
                              short="-d")
    backbone: str | None = option(None, "backbone id of the files (the part of the name before "
                                  "the data) [default: the only one in --embeddings]")
    key_data: str | None = option(None, "data spec whose unlabelled embeddings fit the keys "
                                  "[default: --data]")
    key_split: Literal["train", "test"] = option("train", "split of --key-data for the keys")
    protocol: list[Literal["incremental", "iid"]] = option(
        ["incremental", "iid"], "class-incremental stream and/or the i.i.d. control with the "
        "same sample visits", affects_result=False)
    model: list[Literal["dkvb", "linear", "lp-no-bias", "mlp", "ridge", "ridge-mlp", "vq"]] = \
        option(["dkvb", "linear", "mlp"], "models to run (each is stored on its own; adding one "
               "later reuses the run)", short="-m", affects_result=False)
    classes_per_task: int | None = option(None, "classes per task (upstream --split_size) "
                                          "[default: 2 when that makes at most 10 tasks, else "
                                          "the smallest divisor of the class count that does; "
                                          "1 for 2, 3 or a prime number of classes]",
                                          check=positive)
    class_order: list[int] | None = option(None, "the class order cut into tasks [default: "
                                           "shuffled by --seed]",
                                           check=non_negative.also(not_empty, distinct))
    epochs: int | None = option(None, "epochs per task (upstream --cl_epochs: 2000); the "
                                "i.i.d. control runs as many over all classes [default: about "
                                "1000 steps per task, at most 2000 epochs]", check=positive)
    batch_size: int = option(256, "training batch size (all models)", check=positive)
    num_books: int = option(256, "DKVB heads / codebooks C", check=positive)
    num_pairs: int | None = option(None, "DKVB key-value pairs per codebook J [default: half "
                                   "the key embeddings as a power of two, 16 to 4096]",
                                   check=positive)
    dim_key: int | None = option(None, "DKVB key dimension k [default: 14, at most the "
                                 "embedding's dimension]", check=positive)
    topk: int = option(1, "DKVB pairs fetched per head", check=positive)
    splitting_mode: Literal["random_projection", "chunk"] = option(
        "random_projection", "how the embedding is cut into heads")
    decay: float = option(0.95, "EMA decay of the key initialisation", check=unit_open)
    threshold_factor: float = option(0.1, "dead-code threshold factor of the key "
                                     "initialisation", check=non_negative)
    init_epochs: int | None = option(None, "key-initialisation epochs [default: 10, more when "
                                     "that is under 50 EMA steps]", check=positive)
    lr: float = option(0.3, "DKVB value learning rate (plain SGD)", check=positive)
    label_smoothing: float = option(0.1, "label smoothing (all models)", check=unit_open)
    gradient_clip: float = option(1.0, "gradient-norm clip (all models; 0 = off)",
                                  check=non_negative)
    prune: bool = option(True, "DKVB evaluation leaves never-fetched pairs out")
    probe_optimizer: Literal["sgd", "adam"] = option("sgd", "optimiser of the baselines")
    probe_lr: float = option(1e-3, "learning rate of the baselines", check=positive)
    hidden: int = option(128, "hidden units of the MLP baselines", check=positive)
    ridge_decay: float = option(1e-4, "weight decay of the ridge baselines (upstream 1e-2, "
                                "1e-4, 1e-6)", check=positive)
    vq_decoder: Literal["mlp", "linear"] = option("mlp", "the VQ baseline's trainable decoder")


# -- embed --------------------------------------------------------------------------------------
def execute_embed(cfg: EmbedConfig) -> int:
    from narrows.data import load
    from narrows.errors import UserError
    from narrows.kvb.embeddings import (
        EmbeddingMeta,
        compute_embeddings,
        embedding_path,
        load_backbone,
        read_meta,
        remove_partial,
    )

    if not cfg.checkpoint and not cfg.model:
        raise UserError("no backbone given", "pass --checkpoint FILE, or --model NAME for "
                        "random initial weights")
    session = start(cfg)
    say = session.say
    backbone = load_backbone(cfg.checkpoint, model=cfg.model, seed=cfg.seed)
    spec = cfg.data or backbone.data_spec
    if not spec:
        raise UserError("no data given", "pass --data SPEC (e.g. digits)")
    from narrows.data.specs import parse_spec
    from narrows.models.inputs import RESIZABLE_KINDS

    size = cfg.image_size
    if size is None and parse_spec(spec).kind in RESIZABLE_KINDS:
        size = backbone.input_size  # the card's size is the default
    bundle = load(spec, image_size=size)
    info = bundle.info
    mean, std = _normalisation(cfg.normalize, backbone, info)
    preprocessing = {"mean": list(mean), "std": list(std), "image_size": info.image_size,
                     "resize": cfg.resize}
    out = Path(cfg.out or DEFAULT_EMBEDDINGS)
    for split in dict.fromkeys(cfg.split):
        meta = EmbeddingMeta(data=spec, split=split, backbone=backbone.id,
                             architecture=backbone.architecture, checkpoint=backbone.checkpoint,
                             checkpoint_sha256=backbone.sha256, preprocessing=preprocessing,
                             class_names=tuple(info.class_names))
        path = embedding_path(out, backbone.id, spec, split)
        if path.is_file() and not cfg.overwrite:
            have = read_meta(path)
            if _same_source(have, meta):
                say(f"{path}: already embedded ({have.count} × {have.dim}); pass --overwrite "
                    "to embed again")
                continue
            raise UserError(f"{path} holds other embeddings ({_differing(have, meta)})",
                            "pass --overwrite to replace it, or another --out")
        dataset = bundle.split(split, "none")
        say(f"embedding {len(dataset)} {split} images of {spec} through {backbone.id} "
            f"on {session.device} → {path}")
        partial = path.with_name(f".{path.name}.partial")
        if cfg.overwrite:
            remove_partial(partial)
        result = compute_embeddings(backbone.model, dataset, meta, mean=mean, std=std,
                                    resize=cfg.resize, device=session.device,
                                    batch_size=cfg.batch_size, workers=cfg.workers,
                                    progress=cfg.progress, partial=partial,
                                    save_every=cfg.save_every)
        result.save(path)
        remove_partial(partial)
        say(f"  {result.meta.count} × {result.meta.dim} features → {path}")
    session.close()
    return 0


def _normalisation(mode: str, backbone: Any, info: Any) -> tuple[tuple[float, ...], ...]:
    if mode == "imagenet":
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if mode == "auto" and backbone.mean is not None:
        return tuple(backbone.mean), tuple(backbone.std)
    return tuple(info.mean), tuple(info.std)


def _same_source(have: Any, want: Any) -> bool:
    keys = ("data", "split", "backbone", "checkpoint_sha256", "preprocessing", "layer")
    return all(getattr(have, k) == getattr(want, k) for k in keys)


def _differing(have: Any, want: Any) -> str:
    keys = ("data", "split", "backbone", "checkpoint_sha256", "preprocessing", "layer")
    diff = [f"{k}: {getattr(have, k)!r} here, {getattr(want, k)!r} asked"
            for k in keys if getattr(have, k) != getattr(want, k)]
    return "; ".join(diff[:2])


# -- train --------------------------------------------------------------------------------------
def execute_train(cfg: TrainConfig) -> int:
    import torch

    from narrows.kvb.embeddings import data_key
    from narrows.kvb.results import ContinualResult
    from narrows.runs import default_out

    session = start(cfg)
    say = session.say
    cfg, backbone = _pick_sets(cfg, say)
    train, test, keys = _load_sets(cfg, backbone)
    classes = _num_classes(train, test)
    cfg, tasks = _resolve(cfg, train, keys, classes, say)
    names = _class_names(train, classes)
    run = open_run(cfg, "kvb train", default_out("kvb-train", backbone, data_key(cfg.data)),
                   session)
    shown = " ".join("(" + ", ".join(names[c] for c in task) + ")" for task in tasks)
    say(f"{classes} classes in {len(tasks)} tasks of {cfg.classes_per_task}: {shown}; "
        f"{len(train)} training and {len(test)} test embeddings of dimension {train.dim} "
        f"({backbone}) → {run.path}")
    layer = None
    if any(m in ("dkvb", "vq") for m in cfg.model):
        layer = _fitted_layer(cfg, run, keys, classes, train.dim, session)
    results = []
    for protocol in dict.fromkeys(cfg.protocol):
        for name in dict.fromkeys(cfg.model):
            file = run.file(f"results/{name}-{protocol}.json")
            if file.is_file():
                say(f"{name}, {protocol}: done before ({file})")
                results.append(ContinualResult.load(file))
                continue
            with torch.random.fork_rng(devices=[]):
                result = _run_one(cfg, name, protocol, tasks, train, test, layer, classes,
                                  session.device, say)
            result.meta["class_names"] = list(names)
            if run.writer:
                result.save(file)
            results.append(result)
    _write_outputs(run, results)
    _report(results, run, say)
    session.close()
    return 0


def _pick_sets(cfg: TrainConfig, say: Any) -> tuple[TrainConfig, str]:
    """``cfg`` with ``data`` filled in from the embeddings, and the backbone id of the files."""
    from narrows.cli.common import replace
    from narrows.errors import UserError
    from narrows.kvb.embeddings import choose_embeddings

    directory = Path(cfg.embeddings)
    if not directory.is_dir():
        raise UserError(f"no embedding directory {directory}",
                        "make it with 'narrows kvb embed --checkpoint FILE --data SPEC --out "
                        "DIR'")
    found = choose_embeddings(directory, data=cfg.data, backbone=cfg.backbone)
    if cfg.data is None:
        say(f"data: {found.data} (the embeddings in {directory})")
    return replace(cfg, data=found.data), found.backbone


def _resolve(cfg: TrainConfig, train: Any, keys: Any, classes: int,
             say: Any) -> tuple[TrainConfig, list[list[int]]]:
    """``cfg`` with the data-dependent defaults filled in (and said), and the tasks."""
    from narrows.cli.common import replace
    from narrows.errors import UserError
    from narrows.kvb.defaults import DIM_KEY, default_classes_per_task, divisors, scaled_defaults
    from narrows.kvb.protocols import make_tasks

    chosen: list[str] = []
    per_task = cfg.classes_per_task
    if per_task is None:
        try:
            per_task = default_classes_per_task(classes)
        except ValueError as exc:
            raise UserError(f"the embeddings hold {classes} class: {exc}",
                            "embed a data set with two or more classes") from None
        chosen.append(f"--classes-per-task {per_task}")
    elif classes % per_task:
        fits = [d for d in divisors(classes) if d < classes] or [classes]
        raise UserError(f"{classes} classes cannot be cut into tasks of {per_task}",
                        f"pass --classes-per-task {', '.join(map(str, fits))} (a divisor of "
                        f"{classes}), or leave it out to have it chosen")
    try:
        tasks = make_tasks(classes, per_task, cfg.seed, cfg.class_order)
    except ValueError as exc:
        raise UserError(str(exc), "pass a --class-order that is a permutation of the class "
                        "ids 0..C-1") from None
    if cfg.dim_key is not None and cfg.dim_key > train.dim:
        raise UserError(f"--dim-key {cfg.dim_key} exceeds the {train.dim} dimensions of the "
                        "embeddings (each head projects them to a key)",
                        f"pass --dim-key of at most {train.dim}, or leave it out for "
                        f"{min(DIM_KEY, train.dim)}")
    counts = _per_class(train.labels, classes)
    largest = max(sum(counts[c] for c in task) for task in tasks)
    scaled = scaled_defaults(per_task=largest, keys=len(keys), dim=train.dim,
                             batch_size=cfg.batch_size)
    changes: dict[str, Any] = {"classes_per_task": per_task}
    for field in ("epochs", "num_pairs", "dim_key", "init_epochs"):
        if getattr(cfg, field) is None:
            changes[field] = getattr(scaled, field)
            chosen.append(f"--{field.replace('_', '-')} {changes[field]}")
    if chosen:
        say(f"defaults for {classes} classes, {len(train)} training and {len(keys)} key "
            f"embeddings: {', '.join(chosen)}")
    return replace(cfg, **changes), tasks


def _per_class(labels: Any, classes: int) -> list[int]:
    """Images per class."""
    import torch

    return torch.bincount(labels, minlength=classes).tolist()


def _class_names(train: Any, classes: int) -> list[str]:
    names = list(train.meta.class_names)
    return [str(n) for n in names] if len(names) == classes else [str(c) for c in range(classes)]


def _load_sets(cfg: TrainConfig, backbone: str) -> tuple[Any, Any, Any]:
    from narrows.errors import UserError
    from narrows.kvb.embeddings import embedding_path, load_embeddings

    def get(spec: str, split: str) -> Any:
        path = embedding_path(cfg.embeddings, backbone, spec, split)
        return load_embeddings(path, data=spec, split=split, backbone=backbone)

    train, test = get(cfg.data, "train"), get(cfg.data, "test")
    key_data = cfg.key_data or cfg.data
    same = key_data == cfg.data and cfg.key_split == "train"
    keys = train if same else get(key_data, cfg.key_split)
    if key_data == cfg.data and cfg.key_split == "test":
        raise UserError("--key-split test of the task's own data would fit the keys on the "
                        "test images", "use --key-split train or another --key-data")
    for other in (test, keys):
        if other.dim != train.dim:
            raise UserError(f"embeddings of dimension {other.dim} ({other.meta.data} "
                            f"{other.meta.split}) and {train.dim} ({cfg.data} train) do not mix",
                            "embed every data set through the same backbone")
    return train, test, keys


def _num_classes(train: Any, test: Any) -> int:
    from narrows.errors import UserError

    names = train.meta.class_names
    classes = len(names) if names else int(max(train.labels.max(), test.labels.max())) + 1
    low = min(int(train.labels.min()), int(test.labels.min()))
    high = max(int(train.labels.max()), int(test.labels.max()))
    if low < 0 or high >= classes:
        raise UserError(f"labels {low}..{high} do not fit {classes} classes",
                        "embed a labelled split of the task's data")
    return classes


def _fitted_layer(cfg: TrainConfig, run: Any, keys: Any, classes: int, dim: int,
                  session: Any) -> Any:
    """The key-value layer with its keys fitted on the unlabelled ``keys`` embeddings (cached
    in the run's ``keys.pt``), values zero."""
    from narrows.errors import UserError
    from narrows.kvb import KeyValueBottleneck

    try:
        layer = KeyValueBottleneck(dim, cfg.num_books, cfg.num_pairs, cfg.dim_key, classes,
                                   topk=cfg.topk, splitting_mode=cfg.splitting_mode,
                                   decay=cfg.decay, threshold_factor=cfg.threshold_factor,
                                   seed=cfg.seed)
    except ValueError as exc:
        raise UserError(f"bad key-value bottleneck options: {exc}",
                        "see 'narrows kvb train --help'") from None
    layer = layer.to(session.device)
    file = run.file("keys.pt")
    if file.is_file():
        from narrows.runs.files import read_torch_file, reading

        state = read_torch_file(file, "cached keys file", map_location=session.device)
        with reading(file, "cached keys file"):
            layer.load_state_dict(state)
        session.say(f"keys fitted before ({file})")
        return layer
    session.say(f"fitting {cfg.num_books} × {cfg.num_pairs} keys of dimension {cfg.dim_key} on "
                f"{len(keys)} unlabelled embeddings ({keys.meta.data} {keys.meta.split}), "
                f"{cfg.init_epochs} epochs")
    batches = _ShuffledBatches(keys.features.to(session.device), cfg.batch_size, cfg.seed)
    stats = layer.init_keys(batches, epochs=cfg.init_epochs, progress=cfg.progress)
    if run.writer:
        from narrows.runs import atomic_torch_save

        atomic_torch_save(file, layer.state_dict())
        run.write_json("keys.json", _plain_stats(stats))
    return layer


class _ShuffledBatches:
    """Re-iterable mini-batches of a tensor, in a new seeded order at every pass."""

    def __init__(self, data: Any, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed, self.epoch = data, batch_size, seed, 0

    def __iter__(self) -> Any:
        import torch

        from narrows.runtime import derive_seed

        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0x6B, self.epoch))
        self.epoch += 1
        order = torch.randperm(len(self.data), generator=gen).to(self.data.device)
        for first in range(0, len(order), self.batch_size):
            yield self.data[order[first:first + self.batch_size]]


def _plain_stats(stats: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(stats):
        return {k: v for k, v in dataclasses.asdict(stats).items()
                if isinstance(v, (int, float, str, list, type(None)))}
    return str(stats)


def _run_one(cfg: TrainConfig, name: str, protocol: str, tasks: list[list[int]], train: Any,
             test: Any, layer: Any, classes: int, device: Any, say: Any) -> Any:
    import copy
    import time

    from narrows.kvb.baselines import FitSettings
    from narrows.kvb.learners import BaselineLearner, DKVBLearner, make_baseline
    from narrows.kvb.protocols import make_stream, run_stream
    from narrows.runtime import derive_seed, format_duration

    began = time.perf_counter()
    stream = make_stream(protocol, train.labels, tasks, cfg.epochs, cfg.seed)
    clip = cfg.gradient_clip or None
    data = (train.features, train.labels)
    if name == "dkvb":
        learner: Any = DKVBLearner(copy.deepcopy(layer), data, test.features, lr=cfg.lr,
                                   batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing,
                                   clip=clip, prune=cfg.prune)
        meta: dict[str, Any] = {"lr": cfg.lr, "optimizer": "sgd"}
    else:
        model = make_baseline(name, train.dim, classes, hidden=cfg.hidden,
                              ridge_decay=cfg.ridge_decay, layer=layer,
                              vq_decoder=cfg.vq_decoder, seed=derive_seed(cfg.seed, 0xB5))
        model = model.to(device)
        settings = FitSettings(lr=cfg.probe_lr, batch_size=cfg.batch_size,
                               optimizer=cfg.probe_optimizer, label_smoothing=cfg.label_smoothing,
                               clip=clip, seed=cfg.seed)
        learner = BaselineLearner(model, data, test.features, settings)
        meta = {"lr": cfg.probe_lr, "optimizer": cfg.probe_optimizer,
                "weight_decay": model.weight_decay}
    say(f"{name}, {protocol}: {len(stream.phases)} phases, {stream.visits} sample visits in "
        f"batches of {cfg.batch_size}")
    result = run_stream(learner, stream, test.labels, classes, model=name, meta=meta, log=say)
    result.meta["seconds"] = round(time.perf_counter() - began, 2)
    say(f"{name}, {protocol}: final accuracy {result.final_accuracy:.3f}, forgetting "
        f"{result.forgetting:.3f} [{format_duration(time.perf_counter() - began)}]")
    return result


def _write_outputs(run: Any, results: list[Any]) -> None:
    from narrows.kvb.results import comparison_table, plot_comparison, plot_matrices, summary_table
    from narrows.plotting import pyplot

    if not run.writer or not results:
        return
    csv, md = summary_table(results)
    run.write_text("table.csv", csv)
    run.write_text("table.md", comparison_table(results) + "\n" + md)
    run.write_text("accuracy_matrix.csv", _long_csv(results))
    run.write_json("results.json", [r.summary() for r in results])
    for name, fig in (("comparison.png", plot_comparison(results)),
                      ("accuracy_matrices.png", plot_matrices(results))):
        run.save_figure(name, fig)
        pyplot().close(fig)


def _long_csv(results: list[Any]) -> str:
    import csv
    import io

    rows = [row for r in results for row in r.to_rows()]
    header = ["model", "protocol", "after_phase", "task", "classes", "accuracy"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([f"{row[h]:.4f}" if h == "accuracy" else str(row[h]) for h in header]
                     for row in rows)
    return text.getvalue()


def _report(results: list[Any], run: Any, say: Any) -> None:
    from narrows.kvb.results import comparison_table

    say(comparison_table(results).rstrip())
    say(f"→ {run.file('table.md')} (table.csv, accuracy_matrix.csv, results.json, "
        f"comparison.png, accuracy_matrices.png, results/)")


# -- quickstart ---------------------------------------------------------------------------------
QUICKSTART = {"epochs": 20, "batch_size": 64, "num_books": 64, "num_pairs": 256, "dim_key": 8,
              "init_epochs": 5, "probe_optimizer": "adam", "probe_lr": 1e-3}


def quickstart_step(cfg: CommonOptions, out: Path) -> str:
    """Class-incremental digits through the frozen features of the quickstart's ResNet-20
    (``out/train/best.pt``): DKVB vs linear probe vs MLP, incremental vs i.i.d., into
    ``out/kvb``."""
    from narrows.runs.files import read_json_file

    target = out / "kvb"
    embeddings = target / "embeddings"
    execute_embed(EmbedConfig(checkpoint=str(out / "train" / "best.pt"),
                              **cfg.inherited(embeddings)))
    execute_train(TrainConfig(embeddings=str(embeddings), data="digits",
                              model=["dkvb", "linear", "mlp"], protocol=["incremental", "iid"],
                              **QUICKSTART, **cfg.inherited(target / "train")))
    rows = {(r["model"], r["protocol"]): r
            for r in read_json_file(target / "train" / "results.json", "kvb results file",
                                    kind=list)}
    parts = [f"{m} {100 * rows[(m, 'incremental')]['final_accuracy']:.1f}% "
             f"(iid {100 * rows[(m, 'iid')]['final_accuracy']:.1f}%)"
             for m in ("dkvb", "linear", "mlp")]
    return (f"class-incremental digits (5 tasks of 2), final accuracy: {', '.join(parts)}: "
            f"{target / 'train' / 'table.md'}")


register(Command(
    words=("kvb", "embed"),
    summary="store a frozen backbone's pooled embeddings of a data set (with their metadata)",
    description="Run a frozen backbone (--checkpoint FILE, or --model NAME with random initial "
    "weights) over the train and/or test split and store its pooled pre-logits features with the "
    "labels in DIR/{backbone}_{data}_{split}.pt (the features are the input of the model's last "
    "nn.Linear, or of the classifier timm names; a decomposed checkpoint works too), where backbone is architecture@sha256-prefix "
    "of the checkpoint. The file records the data spec, split, backbone, checkpoint hash, "
    "preprocessing and dimension; 'kvb train' refuses files whose metadata does not match what "
    "it asks for. Written atomically; a killed run resumes from its partial file.",
    config=EmbedConfig,
    target="narrows.cli.kvb:execute_embed",
    epilog="examples:\n  narrows kvb embed --checkpoint runs/train/resnet20_cifar-digits/best.pt "
    "--out embeddings\n  narrows kvb embed --model resnet20_cifar --data digits --out emb-init"
    "\n  narrows kvb embed --checkpoint resnet50.safetensors --model resnet50 "
    "--data cifar10:data --resize 224 --normalize imagenet",
))
register(Command(
    words=("kvb", "train"),
    summary="class-incremental protocols on stored embeddings: DKVB against the baselines",
    description="Cut the classes into tasks (shuffled by --seed) and train each model on them "
    "one after another with one shared output and no task boundaries (incremental), and on all "
    "classes with the same sample visits (iid). DKVB: keys fitted by EMA k-means on unlabelled "
    "embeddings (--key-data/--key-split), frozen; values zero-initialised and trained by plain "
    "SGD from cached fetch indices; never-fetched pairs pruned at evaluation. Baselines: linear "
    "probe (with or without bias), MLP, ridge variants, and a VQ bottleneck with the same keys "
    "and a trainable decoder. Writes per model and protocol the accuracy matrix (results/), "
    "table.md/table.csv (final average accuracy, forgetting), accuracy_matrix.csv and the "
    "figures comparison.png and accuracy_matrices.png. Re-running resumes: finished models are "
    "read back, the keys are reused. What the embeddings say is the default: the data set (the "
    "only one with train and test embeddings in --embeddings), its classes and their names, a "
    "task size that divides the classes, and epochs, key count and key dimension scaled to the "
    "number and dimension of the embeddings; the choices are printed and saved in config.yaml.",
    config=TrainConfig,
    target="narrows.cli.kvb:execute_train",
    epilog="examples:\n  narrows kvb train --embeddings embeddings\n"
    "  narrows kvb train --embeddings embeddings --data digits --epochs 50 "
    "--batch-size 32 --num-books 128 --num-pairs 512 --dim-key 8\n  narrows kvb train "
    "--embeddings emb --data cifar10:data --key-data cifar100:data --model dkvb linear mlp "
    "ridge vq",
))
