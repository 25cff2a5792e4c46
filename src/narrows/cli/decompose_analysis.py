"""``narrows decompose essential | mutual-info | csg-train``: testing and comparing index sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from narrows.cli.app import GROUPS, Command, register
from narrows.cli.common import CommonOptions, SubjectOptions, open_run, start
from narrows.cli.train import DATA_HELP, TrainConfig
from narrows.config import at_least, distinct, fraction, non_negative, not_empty, option, positive
from narrows.errors import UserError

if TYPE_CHECKING:
    from narrows.decompose.indices import ClassIndices

GROUPS.setdefault("decompose", "influential filters per class ('Decomposing the Deep'): "
                  "extraction, the decomposed head, essential features, MI, CSG baseline")
CSG = "CSG comparison"
NOISE = "noise"


@dataclass
class CSGOptions:
    csg_checkpoint: str | None = option(
        None, "a CSG-trained network with its gate (the csg.pt of 'narrows decompose "
        "csg-train') to compare with", metavar="FILE",
        short="--csg-weights", group=CSG)
    csg_k: int = option(5, "channels per class taken from the CSG gate", check=positive,
                        group=CSG)
    csg_order: Literal["largest", "upstream", "both"] = option(
        "largest", "which gates name a class's channels: largest; upstream = the k smallest "
        "(a bug of the original code, only to reproduce its figures); both = one of each",
        group=CSG)


@dataclass
class EssentialConfig(CSGOptions, SubjectOptions, CommonOptions):
    indices: str | None = option(None, "indices JSON of --checkpoint's model (upstream or "
                                 "narrows form)", metavar="FILE")
    k: int | None = option(None, "use the first k ids of each class [default: all in the file]",
                           check=positive)
    sigma: list[float] = option([0.5, 1.0, 2.0], "noise levels σ (upstream: 1); the upstream "
                                "JSON is written at σ = 1 when listed, else at the first",
                                check=non_negative.also(not_empty, distinct),
                                group=NOISE)
    mode: Literal["replace", "add"] = option(
        "replace", "replace the entries by σ·N(0,1) (upstream; σ = 0 zeroes them) or add it "
        "(σ = 0 changes nothing)", group=NOISE)
    split: Literal["test", "train"] = option("test", "split the images come from")
    images: int | None = option(None, "use the first N images of the split [default: all]",
                                check=positive)
    batch_size: int = option(128, "images per forward pass", check=positive,
                             affects_result=False)


@dataclass
class MutualInfoConfig(CSGOptions, SubjectOptions, CommonOptions):
    indices: list[str] = option([], "indices JSON files ('ours'): each is used at its own k, "
                                "or truncated to a smaller --ks", metavar="FILE")
    ks: list[int] | None = option(None, "k values, one row each [default: the k of each "
                                  "--indices file, else 5 10 20]", check=at_least(1).also(not_empty))
    channels: int | None = option(None, "the feature width D the ids index into [default: "
                                  "from the model, or recorded in the file]", check=positive)
    random_draws: int = option(10, "random index sets per k averaged into the 'random' "
                               "column (0 = none)", check=non_negative)
    diagonal: bool = option(True, "plot the upstream score (diagonal pairs included); "
                            "--no-diagonal plots the corrected score (all scores are in the "
                            "tables either way)", affects_result=False)
    mis: bool = option(False, "also compute MIS (kNN MI of each channel with each class) of "
                       "the model(s) on test features; needs --checkpoint or --csg-checkpoint")
    images: int | None = option(None, "MIS: use the first N test images [default: all]",
                                check=positive)
    batch_size: int = option(128, "MIS: images per forward pass", check=positive,
                             affects_result=False)


@dataclass
class CSGTrainConfig(TrainConfig):
    data: str | None = option(None, DATA_HELP + " [default: the data of --checkpoint, else "
                              "digits]", short="-d")
    schedule: Literal["alternate", "joint"] = option(
        "alternate", "alternate: whole epochs alternate between the ordinary path (CE) and the "
        "CSG path (CE of the gated logits + sparsity), as the official code; joint: both "
        "terms every step (the paper's form)", group=CSG)
    period: int = option(2, "alternate: epochs per cycle", check=positive, group=CSG)
    csg_epochs: int = option(1, "alternate: CSG epochs at the end of each cycle",
                             check=positive, group=CSG)
    warmup: int = option(0, "alternate: ordinary epochs before the first cycle",
                         check=non_negative, group=CSG)
    lam_ce: float = option(1.0, "weight of the CSG path's cross-entropy", check=non_negative,
                           group=CSG)
    lam_l1: float = option(0.05, "weight of the sparsity hinge max(0, |G|_1 - density·C·D)",
                           check=non_negative, group=CSG)
    target_density: float = option(0.1, "gate density below which the hinge is 0 (official "
                                   "0.2)", check=fraction, group=CSG)
    clip: Literal["clamp", "official", "none"] = option(
        "clamp", "gate constraint after each step: clamp to [0, 1]; official = divide each "
        "channel's gates by their maximum over classes, then clamp; none", group=CSG)
    gate_init: float = option(0.5, "initial value of every gate (official 0.5)",
                              check=fraction, group=CSG)
    k: int = option(5, "channels per class written to indices_csg.json (largest gates)",
                    check=positive, group=CSG)


# -- shared ----------------------------------------------------------------------------------

@dataclass
class Tested:
    """One model with one index set to test: ``name`` is its column/key in the results."""

    name: str
    model: Any
    indices: ClassIndices
    bundle: Any
    normalizer: Any
    description: str


def _orders(choice: str) -> list[tuple[str, str]]:
    """``(result name, gate order)`` pairs for ``--csg-order``."""
    pairs = {"largest": ("csg", "largest"), "upstream": ("csg-upstream", "upstream")}
    return list(pairs.values()) if choice == "both" else [pairs[choice]]


def _model_shape(model: Any) -> tuple[int, int]:
    from narrows.decompose.parts import split_head

    _, linear = split_head(model)
    return linear.out_features, linear.in_features


def _ours(cfg: Any, path: str, k: int | None = None):
    """(subject, indices of ``path`` checked against the subject's model, first ``k`` ids)."""
    from narrows.decompose.indices import ClassIndices
    from narrows.models.subject import load_subject

    subject = load_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    classes, channels = _model_shape(subject.model)
    indices = ClassIndices.load(path, num_classes=classes, num_channels=channels)
    return subject, _truncate(indices, k, path)


def _truncate(indices: ClassIndices, k: int | None, source: str) -> ClassIndices:
    if k is None:
        return indices
    short = [c for c, row in enumerate(indices.indices) if len(row) < k]
    if short:
        raise UserError(f"{source} has only {len(indices.indices[short[0]])} ids for class "
                        f"{short[0]}, fewer than k = {k}", "pass a smaller --k")
    return indices.top(k)


def _csg(cfg: Any, data: str | None):
    """(loaded CSG network, its data bundle, normaliser)."""
    from narrows.decompose.csg import load_csg
    from narrows.models.inputs import data_for_model
    from narrows.training import Normalizer

    loaded = load_csg(cfg.csg_checkpoint, name=cfg.model)
    spec = data or (loaded.card.data_spec if loaded.card else None)
    if not spec:
        raise UserError(f"{cfg.csg_checkpoint} does not say which data it was trained on",
                        "pass --data SPEC")
    classes, _ = _model_shape(loaded.model)
    served = data_for_model(spec, loaded.card, None, image_size=cfg.image_size,
                            what=str(cfg.csg_checkpoint))
    if classes != served.bundle.info.num_classes:
        raise UserError(f"the CSG network predicts {classes} classes but {spec} has "
                        f"{served.bundle.info.num_classes}", "use the data set it was trained on")
    return loaded, served.bundle, Normalizer(served.mean, served.std)


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


# -- essential -------------------------------------------------------------------------------

def _essential_subjects(cfg: EssentialConfig) -> list[Tested]:
    from narrows.decompose.csg import csg_topk
    from narrows.training import Normalizer

    tested: list[Tested] = []
    data = cfg.data
    if cfg.indices:
        subject, indices = _ours(cfg, cfg.indices, cfg.k)
        tested.append(Tested("ours", subject.model, indices, subject.bundle,
                             Normalizer(subject.mean, subject.std),
                             f"{subject.name} with {cfg.indices}"))
        data = data or subject.bundle.info.spec
    if cfg.csg_checkpoint:
        loaded, bundle, normalizer = _csg(cfg, data)
        for name, order in _orders(cfg.csg_order):
            tested.append(Tested(name, loaded.model, csg_topk(loaded.gate, cfg.csg_k, order),
                                 bundle, normalizer,
                                 f"CSG {cfg.csg_checkpoint}, {order} {cfg.csg_k} gates"))
    return tested


def execute_essential(cfg: EssentialConfig) -> int:
    from narrows.decompose.essential import EssentialResult, essential_features, plot_results
    from narrows.plotting import pyplot
    from narrows.runs import default_out

    if not cfg.indices and not cfg.csg_checkpoint:
        raise UserError("nothing to test", "pass --indices FILE with --checkpoint FILE, "
                        "and/or --csg-checkpoint FILE")
    if cfg.indices and not (cfg.checkpoint or cfg.model):
        raise UserError("--indices needs the model they were extracted from",
                        "pass --checkpoint FILE (or --model NAME for initial weights)")
    session = start(cfg)
    tested = _essential_subjects(cfg)
    stem = Path(cfg.checkpoint or cfg.csg_checkpoint or cfg.model or "model").stem
    run = open_run(cfg, "decompose essential", default_out("decompose", "essential", stem),
                   session)
    results: dict[str, EssentialResult] = {}
    for item in tested:
        split = item.bundle.split(cfg.split, "none")
        n = len(split) if cfg.images is None else min(cfg.images, len(split))
        cache = run.file(f"essential_{item.name}.json")
        lists = [list(r) for r in item.indices.indices]
        if cache.is_file():
            saved = EssentialResult.load(cache)
            if saved.meta.get("index_lists") == lists:
                results[item.name] = saved
                print(f"{item.name}: reusing {cache}")
                continue
        print(f"{item.name}: {item.description}; {n:,} {cfg.split} images → {n:,} backbone "
              f"forwards + {n * len(cfg.sigma) * 3:,} head evaluations ({len(cfg.sigma)} "
              f"levels × 3 conditions), {cfg.mode} noise")
        result = essential_features(
            item.model, split, item.indices, sigmas=cfg.sigma, mode=cfg.mode, seed=cfg.seed,
            normalizer=item.normalizer, device=session.device, batch_size=cfg.batch_size,
            limit=cfg.images, progress=cfg.progress)
        result.meta.update(model=item.description, split=cfg.split, index_lists=lists,
                           class_names=list(item.bundle.info.class_names))
        result.save(cache)
        results[item.name] = result
    first = next(iter(results.values()))
    level = first.sigmas[first.level()]
    run.write_json("results_essential_features.json",
                   {name: r.to_upstream(level) for name, r in results.items()})
    rows = [{"model": name, **row} for name, r in results.items() for row in r.to_rows()]
    run.write_text("essential.csv", _csv(rows))
    table = _essential_markdown(results)
    run.write_text("essential.md", table)
    plt = pyplot()
    fig, _ = plot_results(results)
    run.save_figure("essential.png", fig)
    plt.close(fig)
    print(table, end="")
    print(f"→ {run.file('results_essential_features.json')} (σ = {level:g}), "
          f"{run.file('essential.csv')}, {run.file('essential.md')}, {run.file('essential.png')}")
    session.close()
    return 0


def _essential_markdown(results: dict[str, Any]) -> str:
    columns = ["model", "σ", "images", "clean", "noise at I_c", "noise at the others",
               "noise at |I_c| random others"]
    rows = []
    for name, result in results.items():
        for row in result.to_rows(per_class=False):
            n = row["images"]
            rows.append([name, f"{row['sigma']:g}", str(n)] + [
                f"{row[key]} ({100 * row[key] / n:.1f} %)" if n else str(row[key])
                for key in ("clean", "noise_at_inf", "noise_at_noninf", "noise_at_random")])
    mode = next(iter(results.values())).mode
    return (f"Images still classified correctly ({mode} noise on the pooled features, "
            "scored by the full linear layer):\n\n" + _markdown(columns, rows))


# -- mutual information ----------------------------------------------------------------------

def _width(cfg: MutualInfoConfig, model: Any, csg_model: Any) -> int | None:
    widths = {}
    if model is not None:
        widths["--checkpoint/--model"] = _model_shape(model)[1]
    if csg_model is not None:
        widths["--csg-checkpoint"] = _model_shape(csg_model)[1]
    if cfg.channels is not None:
        for where, d in widths.items():
            if d != cfg.channels:
                raise UserError(f"--channels {cfg.channels} but {where} has {d} channels",
                                "drop --channels")
        return cfg.channels
    if len(set(widths.values())) > 1:
        raise UserError(f"the two models have different widths ({widths})",
                        "compare models with the same last feature layer")
    return next(iter(widths.values()), None)


def _recorded_width(paths: list[str]) -> int:
    """The feature width recorded in the (narrows-form) indices files; one, or an error."""
    import json

    widths = set()
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # ClassIndices.load reports unreadable files
        if (isinstance(data, dict) and isinstance(data.get("num_channels"), int)
                and not isinstance(data["num_channels"], bool)):
            widths.add(data["num_channels"])
    if len(widths) != 1:
        raise UserError("the feature width D, which MI depends on, is not known"
                        + (f" (the files disagree: {sorted(widths)})" if widths else
                           " (upstream-form indices files do not record it)"),
                        "pass --channels D, or --checkpoint/--model")
    return widths.pop()


def _source(files: list[ClassIndices], names: list[str]):
    """``k -> ClassIndices``: the file with exactly ``k`` ids per class, else the first ``k`` ids
    of the shortest file with more."""
    def pick(k: int) -> ClassIndices:
        exact = [f for f in files if f.k == k]
        if exact:
            return exact[0]
        longer = sorted((f for f in files if min(len(r) for r in f.indices) >= k),
                        key=lambda f: min(len(r) for r in f.indices))
        if not longer:
            raise UserError(f"no --indices file has {k} ids for every class ({', '.join(names)})",
                            "pass a file extracted with that k, or a smaller --ks")
        return longer[0].top(k)

    return pick


def execute_mutual_info(cfg: MutualInfoConfig) -> int:
    from narrows.decompose.csg import csg_topk
    from narrows.decompose.indices import ClassIndices
    from narrows.decompose.mutual_info import LABELS, SCORES, mi_table, mis, pooled_features
    from narrows.plotting import pyplot
    from narrows.runs import default_out

    if not cfg.indices and not cfg.csg_checkpoint:
        raise UserError("no index sets given", "pass --indices FILE... and/or "
                        "--csg-checkpoint FILE")
    if cfg.mis and not (cfg.checkpoint or cfg.csg_checkpoint):
        raise UserError("--mis needs a model", "pass --checkpoint and/or --csg-checkpoint")
    session = start(cfg)
    subject = None
    if cfg.checkpoint or cfg.model:
        from narrows.models.subject import load_subject

        subject = load_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    loaded = bundle = normalizer = None
    if cfg.csg_checkpoint:
        loaded, bundle, normalizer = _csg(cfg, cfg.data or (subject.bundle.info.spec
                                                            if subject else None))
    width = _width(cfg, subject.model if subject else None, loaded.model if loaded else None)
    if width is None:
        width = _recorded_width(cfg.indices)
    classes = _model_shape(subject.model)[0] if subject else (
        _model_shape(loaded.model)[0] if loaded else None)
    files = [ClassIndices.load(p, num_classes=classes, num_channels=width) for p in cfg.indices]
    if len({f.num_classes for f in files}) > 1:
        raise UserError("the --indices files are for different numbers of classes",
                        "give files of one model")
    if cfg.ks:
        ks = list(cfg.ks)
    elif files:
        ks = sorted({f.k if f.k is not None else min(len(r) for r in f.indices) for f in files})
    else:
        ks = [k for k in (5, 10, 20) if k <= width]
    too_wide = [k for k in ks if k > width]
    if too_wide:
        raise UserError(f"k = {too_wide[0]} is more than the {width} channels", "lower --ks")
    sources = {}
    if files:
        sources["ours"] = _source(files, cfg.indices)
    if loaded is not None:
        for name, order in _orders(cfg.csg_order):
            sources[name] = lambda k, o=order: csg_topk(loaded.gate, k, o)
    stem = Path(cfg.checkpoint or cfg.csg_checkpoint or cfg.indices[0]).stem
    run = open_run(cfg, "decompose mutual-info", default_out("decompose", "mutual-info", stem),
                   session)
    num_classes = classes or (files[0].num_classes if files else None)
    print(f"pairwise MI of index sets: {len(sources)} sources × {len(ks)} k "
          f"({', '.join(map(str, ks))}), D = {width}"
          + (f", random: mean of {cfg.random_draws} draws" if cfg.random_draws else ""))
    table = mi_table(sources, ks, random_draws=cfg.random_draws, num_classes=num_classes,
                     num_channels=width, seed=cfg.seed)
    table.meta.update(channels=width, indices=list(cfg.indices),
                      csg_checkpoint=cfg.csg_checkpoint, csg_order=cfg.csg_order)
    mis_scores = _mis_scores(cfg, run, subject, loaded, bundle, normalizer, session, mis,
                             pooled_features) if cfg.mis else {}
    doc = table.to_json()
    if mis_scores:
        doc["mis"] = mis_scores
    run.write_json("mutual_info.json", doc)
    run.write_text("mutual_info.csv", _csv(table.to_rows()))
    parts = [f"### {LABELS[s]}\n\n" + table.to_markdown(s) for s in SCORES]
    if mis_scores:
        parts.append("### MIS (higher: more class-specific channels)\n\n" + _markdown(
            ["model", "MIS", "images"], [[n, f"{v['mis']:.4f}", str(v["images"])]
                                         for n, v in mis_scores.items()]))
    text = "\n".join(parts)
    run.write_text("mutual_info.md", text)
    plt = pyplot()
    fig, _ = table.plot("upstream" if cfg.diagonal else "no_diagonal")
    run.save_figure("mutual_info.png", fig)
    plt.close(fig)
    print(text, end="")
    print(f"→ {run.file('mutual_info.md')}, {run.file('mutual_info.csv')}, "
          f"{run.file('mutual_info.json')}, {run.file('mutual_info.png')}")
    session.close()
    return 0


def _mis_scores(cfg, run, subject, loaded, bundle, normalizer, session, mis, pooled_features):
    """MIS per model, cached in ``mis_<name>.json`` (resumable)."""
    from narrows.training import Normalizer

    models = []
    if subject is not None and cfg.checkpoint:
        models.append(("ours", subject.model, subject.bundle, Normalizer(subject.mean,
                                                                         subject.std)))
    if loaded is not None:
        models.append(("csg", loaded.model, bundle, normalizer))
    out = {}
    for name, model, data, norm in models:
        cache = run.file(f"mis_{name}.json")
        if cache.is_file():
            out[name] = run.read_json(cache.name, required_keys=("mis", "images"))
            continue
        test = data.test()
        n = len(test) if cfg.images is None else min(cfg.images, len(test))
        classes, width = _model_shape(model)
        print(f"MIS of {name}: {n:,} test images, {classes} × {width} kNN MI estimates")
        h, labels = pooled_features(model, test, normalizer=norm, device=session.device,
                                    batch_size=cfg.batch_size, limit=cfg.images,
                                    progress=cfg.progress)
        result = mis(h, labels, num_classes=classes)
        out[name] = {"mis": result.score, "images": result.images,
                     "matrix": result.matrix.tolist()}
        run.write_json(cache.name, out[name])
    return {n: {k: v for k, v in d.items() if k != "matrix"} | {"file": f"mis_{n}.json"}
            for n, d in out.items()}


# -- csg-train -------------------------------------------------------------------------------

def execute_csg_train(cfg: CSGTrainConfig) -> int:
    from narrows.cli.train import build_model, load_training_data, settings_from
    from narrows.decompose.csg import Alternate, CSGLoss, CSGNetwork, csg_topk, density, save_csg
    from narrows.runs import default_out
    from narrows.training import LAST, fit

    session = start(cfg)
    if session.dist.enabled:
        raise UserError("csg-train runs in one process (the gate is unused in ordinary "
                        "epochs, which DDP does not allow)", "run it without torchrun")
    if cfg.csg_epochs > cfg.period:
        raise UserError(f"--csg-epochs {cfg.csg_epochs} is more than --period {cfg.period}",
                        "use --csg-epochs <= --period")
    cfg = _with_data(cfg)
    data = load_training_data(cfg)
    model, card = build_model(cfg, data.info)
    network = CSGNetwork(model, init=cfg.gate_init)
    classes, width = network.num_classes, network.num_channels
    if cfg.k > width:
        raise UserError(f"--k {cfg.k} is more than the {width} channels", "lower --k")
    schedule = Alternate(cfg.period, cfg.csg_epochs, cfg.warmup)
    loss = CSGLoss(network, schedule=cfg.schedule, alternate=schedule, lam_ce=cfg.lam_ce,
                   lam_l1=cfg.lam_l1, target_density=cfg.target_density, clip=cfg.clip,
                   label_smoothing=cfg.label_smoothing)
    run = open_run(cfg, "decompose csg-train",
                   default_out("decompose-csg-train", card.architecture, cfg.data), session)
    if cfg.resume and not run.exists(LAST):
        raise UserError(f"--resume given but {run.path} has no checkpoint to resume from",
                        "drop --resume to start a new run")
    csg_epochs = [e + 1 for e in range(cfg.epochs) if loss.csg_epoch(e)]
    say = session.say
    say(f"CSG training of {card.architecture} ({classes} classes × {width} gates) on "
        f"{cfg.data}: {cfg.epochs} epochs × {len(data.train()):,} images; CSG-path epochs: "
        + (", ".join(map(str, csg_epochs)) if cfg.schedule == "alternate" else "all (joint)")
        + f"; {session.device}, {session.threads} threads → {run.path}")
    result = fit(network, data, settings_from(cfg), card=card, device=session.device, run=run,
                 dist=session.dist, progress=cfg.progress, log=say, loss_fn=loss)
    gate = network.project_(cfg.clip).detach().cpu()
    settings = {k: getattr(cfg, k) for k in ("schedule", "period", "csg_epochs", "warmup",
                                             "lam_ce", "lam_l1", "target_density", "clip",
                                             "gate_init", "epochs", "seed")}
    save_csg(run.file("csg.pt"), network, card, settings)
    indices = csg_topk(gate, cfg.k)
    indices.meta.update(model=card.architecture, data=cfg.data, checkpoint=str(run.file("csg.pt")))
    indices.save(run.file("indices_csg.json"))
    _draw_gate(run, gate, result.metrics, data.info.class_names)
    summary = {"model": card.architecture, "data": cfg.data, "epochs": result.epochs,
               "std_top1": result.final.top1 if result.final else None,
               "best_top1": result.best_top1, "gate_density": density(gate),
               "csg": str(run.file("csg.pt")), "indices": str(run.file("indices_csg.json"))}
    run.write_json("results.json", summary)
    top1 = f"{100 * result.final.top1:.2f}%" if result.final else "n/a"
    say(f"done: test top-1 (ordinary path) {top1}, gate density {density(gate):.3f}; "
        f"network + gate in {run.file('csg.pt')}, top-{cfg.k} gates in "
        f"{run.file('indices_csg.json')}, figure {run.file('gate.png')}")
    session.close()
    return 0


def _with_data(cfg: CSGTrainConfig) -> CSGTrainConfig:
    """``cfg`` with ``data`` filled in: the checkpoint card's data spec, else ``digits``."""
    from narrows.cli.common import replace

    if cfg.data:
        return cfg
    spec = None
    if cfg.checkpoint:
        from narrows.models import read_checkpoint

        card = read_checkpoint(cfg.checkpoint).card
        spec = card.data_spec if card else None
    return replace(cfg, data=spec or "digits")


def _draw_gate(run, gate, rows: list[dict[str, Any]], class_names: Any = None) -> None:
    """gate.png: the gate matrix and its density per epoch."""
    from narrows.plotting import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4),
                                      gridspec_kw={"width_ratios": [2, 1]})
    low, high = min(0.0, float(gate.min())), float(gate.max())
    image = left.imshow(gate.numpy(), aspect="auto", cmap="viridis", vmin=low,
                        vmax=high if high > low else low + 1.0)
    left.set_xlabel("channel")
    left.set_ylabel("class")
    if gate.shape[0] <= 20:
        names = list(class_names or [])
        shown = names if len(names) == gate.shape[0] else list(range(gate.shape[0]))
        left.set_yticks(range(gate.shape[0]), [str(n) for n in shown], fontsize=8)
    left.set_title("CSG gate", fontsize=9)
    fig.colorbar(image, ax=left)
    epochs = [r["epoch"] for r in rows if "gate_density" in r]
    right.plot(epochs, [r["gate_density"] for r in rows if "gate_density" in r], marker="o")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("epoch")
    right.set_ylabel("gate density |G|₁ / (C·D)")
    right.grid(alpha=0.3)
    fig.tight_layout()
    run.save_figure("gate.png", fig)
    plt.close(fig)


register(Command(
    words=("decompose", "essential"),
    summary="noise on each class's influential channels vs the others vs a random control",
    description="For each image, replace (or perturb) with Gaussian noise the pooled features "
    "at its class's influential channels (I_c), at all the other channels, and at |I_c| random "
    "other channels (an equal-size control upstream lacks), then count the images the full "
    "linear layer still classifies correctly, per class and noise level. Seeded per image. "
    "Writes results_essential_features.json (the upstream schema, with extra keys), "
    "essential.csv/.md, essential.png; each model's counts are kept, so re-running resumes.",
    config=EssentialConfig,
    target="narrows.cli.decompose_analysis:execute_essential",
    epilog="examples:\n"
    "  narrows decompose essential --checkpoint best.pt --indices inds.json\n"
    "  narrows decompose essential --checkpoint resnet20-12fca82f.th -m resnet20_cifar "
    "-d cifar10:data --indices resnet20_cifar-10_indices.json --sigma 1\n"
    "  narrows decompose essential --checkpoint best.pt --indices inds.json "
    "--csg-checkpoint runs/decompose-csg-train/.../csg.pt --csg-order both",
))

register(Command(
    words=("decompose", "mutual-info"),
    summary="pairwise MI of class index sets (upstream score and corrected), over k",
    description="Scores how much the classes' index sets share: the upstream mean pairwise "
    "MI of the indicator vectors with the diagonal (for parity), the same without the "
    "diagonal (the corrected score: the diagonal is each class's entropy, a constant of k), "
    "the mean Jaccard overlap and the union size, for each k and each source (our indices, "
    "CSG gates, random sets). --mis adds the CSG paper's MIS of the model(s). Writes "
    "mutual_info.md/.csv/.json and mutual_info.png.",
    config=MutualInfoConfig,
    target="narrows.cli.decompose_analysis:execute_mutual_info",
    epilog="examples:\n"
    "  narrows decompose mutual-info --indices inds5.json inds10.json inds20.json "
    "--channels 64\n"
    "  narrows decompose mutual-info --checkpoint best.pt --indices inds.json --ks 5 10 20 "
    "--csg-checkpoint csg.pt --csg-order both --mis",
))

register(Command(
    words=("decompose", "csg-train"),
    summary="train with a class-specific gate (CSG baseline, Liang et al. 2020)",
    description="Train as 'narrows train' does, adding a gate G (classes × channels) on the "
    "pooled features: the CSG path classifies h ⊙ G[y] with the same linear layer, with a "
    "hinge on |G|_1 pushing the gate towards --target-density. Inference uses the ordinary "
    "path. metrics.jsonl gains csg_epoch, std_ce, csg_ce, csg_top1, gate_density and "
    "gate_hinge. Writes csg.pt (the network with its card, loadable anywhere, and the gate), "
    "indices_csg.json (each class's largest gates) and gate.png; resumable.",
    config=CSGTrainConfig,
    target="narrows.cli.decompose_analysis:execute_csg_train",
    epilog="examples:\n"
    "  narrows decompose csg-train --checkpoint runs/train/resnet20_cifar-digits/best.pt "
    "--epochs 4 --lr 0.01\n"
    "  narrows decompose csg-train -d cifar10:data --epochs 200 --period 3 --schedule "
    "alternate --clip official --target-density 0.2",
))
