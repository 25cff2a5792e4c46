"""Train a readout bottleneck into a run directory: ``narrows attribution readout-train`` as a
function (:func:`train_readout_run`).

The :class:`~narrows.runs.RunDir` holds ``readout_statistics.pt`` (estimated once, reused on a
rerun), ``readout_last.pt`` (written after every epoch; a rerun continues from it),
``metrics.jsonl``, ``readout_curves.png`` and, at the end, ``readout.pt``: the readout with
everything needed to rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from narrows.attribution.options import ReadoutTrainOptions

if TYPE_CHECKING:
    from torch import nn

    from narrows.runs import RunDir

__all__ = ["ReadoutOptions", "ReadoutRun", "draw_curves", "train_readout_run", "write_curves"]

STATISTICS_FILE = "readout_statistics.pt"
READOUT_FILE = "readout.pt"
CURVES_FILE = "readout_curves.png"
FORMAT_KIND = "readout_run"  # saved files: "format": narrows.readout_run/1


@dataclass
class ReadoutOptions(ReadoutTrainOptions):
    """What readout to train and how (the defaults of ``attribution readout-train``), and the
    ``seed``."""

    seed: int = 0

    @classmethod
    def from_options(cls, options: Any, seed: int = 0, **overrides: Any) -> ReadoutOptions:
        """The readout options of ``options`` (a
        :class:`~narrows.attribution.options.ReadoutTrainOptions` or the command's config),
        then ``overrides``."""
        values = {f.name: getattr(options, f.name) for f in fields(ReadoutTrainOptions)}
        return cls(**{**values, "seed": seed, **overrides})


@dataclass
class ReadoutRun:
    """The trained readout's file, the per-epoch history and the training record."""

    path: Path
    history: list[dict[str, Any]]
    training: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """The final loss, cross-entropy and capacity."""
        last = self.history[-1]
        return (f"done: loss {last['loss']:.4f}, cross-entropy {last['ce']:.4f}, capacity "
                f"{last['capacity']:.4f} nats after {last['epoch']} epochs")

    def to_rows(self) -> list[dict[str, Any]]:
        """One record per epoch (epoch, loss, ce, capacity, samples, seconds)."""
        return [dict(h) for h in self.history]

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """The loss and capacity curves on two axes (``ax``: a pair of axes, or None for a new
        figure, as readout_curves.png); returns ``(fig, axes)``."""
        if ax is None:
            from narrows.plotting import pyplot

            _, ax = pyplot().subplots(1, 2, figsize=(9, 3.4))
        draw_curves(ax, self.history)
        return ax[0].figure, ax

    def save(self, path: str | Path) -> Path:
        """Write the readout's path, the history and the training record to one JSON file,
        after the format header (the readout itself stays in its own file)."""
        from narrows.attribution.result_files import save_json_result
        from narrows.runs.results import provenance

        options = {k: v for k, v in self.training.items() if k not in ("data", "seed", "final")}
        origin = provenance(data=self.training.get("data"), seed=self.training.get("seed"),
                            options=options or None)
        state = {"path": str(self.path), "history": self.history, "training": self.training}
        return save_json_result(path, FORMAT_KIND, state, origin)

    @classmethod
    def load(cls, path: str | Path) -> ReadoutRun:
        """Read a record written by :meth:`save`."""
        from narrows.attribution.result_files import load_json_result
        from narrows.runs.files import reading

        what, fix = "readout run file", "delete it and train the readout again"
        state = load_json_result(path, FORMAT_KIND, what, fix,
                                 required_keys=("path", "history"))
        with reading(path, what, fix):
            return cls(path=Path(state["path"]), history=list(state["history"]),
                       training=dict(state.get("training", {})))


def readout_statistics(model: nn.Module, dataset: Any, normalizer: Any, device: Any,
                       path: Path, options: ReadoutOptions, log: Any = print,
                       names: dict[str, str] | None = None) -> Any:
    """The readout statistics from ``path``, or estimated on ``dataset`` and saved there."""
    import torch

    from narrows.attribution.readout import ReadoutStatistics, estimate_readout_statistics
    from narrows.attribution.statistics import DEFAULT_N_SAMPLES, few_samples_note

    if path.is_file():
        stats = ReadoutStatistics.load(path)
        log(f"reusing readout statistics from {path} (n={stats.logits.n:,})")
        return stats
    loader = torch.utils.data.DataLoader(dataset, batch_size=options.stats_batch_size,
                                         shuffle=True,
                                         generator=torch.Generator().manual_seed(options.seed))
    count = options.n_samples if options.n_samples is not None else DEFAULT_N_SAMPLES
    n = min(count, len(dataset))
    log(f"estimating readout statistics on {n:,} train images ({n:,} forwards)")
    batches = (normalizer(x.to(device)) for x, _ in loader)
    stats = estimate_readout_statistics(model, batches, layer=options.layer,
                                        readout_layers=options.readout_layers,
                                        n_samples=count, kind=options.kind, device=device,
                                        warn=False)
    few_samples_note(options.n_samples, stats.logits.n, "train", "the readout statistics",
                     names=names)
    stats.save(path)
    return stats


def _loader_factory(options: ReadoutOptions, dataset: Any, normalizer: Any, device: Any):
    """``factory(epoch)``: that epoch's shuffled (normalised images, labels) batches."""
    import torch

    from narrows.runtime import derive_seed

    class Batches:
        """One epoch's batches, with their count (the logger's step numbers need it)."""

        def __init__(self, loader: Any) -> None:
            self.loader = loader

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self):
            for images, labels in self.loader:
                yield normalizer(images.to(device)), labels.to(device)

    def factory(epoch: int) -> Batches:
        generator = torch.Generator().manual_seed(derive_seed(options.seed, epoch, 1))
        return Batches(torch.utils.data.DataLoader(dataset, batch_size=options.batch_size,
                                                   shuffle=True, generator=generator))

    return factory


def _train_subset(options: ReadoutOptions, dataset: Any) -> Any:
    """A fixed random subset of ``train_images`` images of ``dataset`` (all by default)."""
    import torch

    if options.train_images is None or options.train_images >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(options.seed))
    return torch.utils.data.Subset(dataset, order[: options.train_images].tolist())


def write_curves(run: Any, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl (one line per finished epoch) and the loss / capacity curves."""
    from narrows.plotting import pyplot

    run.write_metrics(history)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    draw_curves(axes, history)
    fig.suptitle("readout training")
    fig.tight_layout()
    run.save_figure(CURVES_FILE, fig)
    plt.close(fig)


def log_epoch(logger: Any, history: list[dict[str, Any]], steps_per_epoch: int) -> None:
    """Log the curves of ``history`` so far to ``logger`` (a :class:`narrows.runs.logger.
    RunLogger`) at the last step of its last epoch (the epoch's numbers are logged by
    :func:`~narrows.attribution.readout.train_readout`)."""
    if not logger.active or not history:
        return
    from narrows.plotting import pyplot

    step = int(history[-1]["epoch"]) * steps_per_epoch - 1
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.4))
    try:
        draw_curves(axes, history)
        fig.tight_layout()
        logger.figure("readout_curves", fig, step)
    finally:
        pyplot().close(fig)


def draw_curves(axes: Any, history: list[dict[str, Any]]) -> None:
    """Loss and cross-entropy on ``axes[0]``, mean capacity on ``axes[1]``, per epoch."""
    epochs = [h["epoch"] for h in history]
    axes[0].plot(epochs, [h["loss"] for h in history], marker="o", label="loss")
    axes[0].plot(epochs, [h["ce"] for h in history], marker="o", label="cross-entropy")
    axes[0].set_ylabel("train loss")
    axes[0].legend()
    axes[1].plot(epochs, [h["capacity"] for h in history], marker="o", color="C2")
    axes[1].set_ylabel("mean capacity (nats/element)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)


def train_readout_run(model: nn.Module, bundle: Any, out: RunDir,
                      options: ReadoutOptions | None = None, *, normalizer: Any,
                      device: Any = None, progress: bool = True, card: Any = None,
                      checkpoint: str | None = None, name: str = "model", log: Any = print,
                      names: dict[str, str] | None = None) -> ReadoutRun:
    """Train a readout bottleneck for ``model`` on ``bundle``'s train split into ``out``,
    resuming a run there; ``normalizer`` maps the data set's images to model inputs. ``card``
    and ``checkpoint`` are stored in readout.pt; ``log`` prints progress lines. Returns a
    :class:`ReadoutRun`. ``out.logger`` (see :meth:`RunDir.attach_logger`) gets every epoch's
    loss terms (``epoch/<name>``) and curves; it is closed when this returns or fails."""
    try:
        return _train_readout_run(model, bundle, out, options, normalizer=normalizer,
                                  device=device, progress=progress, card=card,
                                  checkpoint=checkpoint, name=name, log=log, names=names)
    finally:
        out.close()


def _train_readout_run(model: nn.Module, bundle: Any, out: RunDir,
                       options: ReadoutOptions | None, *, normalizer: Any, device: Any,
                       progress: bool, card: Any, checkpoint: str | None, name: str, log: Any,
                       names: dict[str, str] | None) -> ReadoutRun:
    import torch

    from narrows.attribution.readout import ReadoutBottleneck, save_readout, train_readout
    from narrows.runtime import derive_seed

    options = options or ReadoutOptions()
    model.to(device)
    stats = readout_statistics(model, bundle.split("train"), normalizer, device,
                               out.file(STATISTICS_FILE), options, log, names)
    torch.manual_seed(derive_seed(options.seed, 2))  # the readout net's initial weights
    readout = ReadoutBottleneck(model, stats, variant=options.variant, sigma=options.sigma)
    dataset = _train_subset(options, bundle.split("train", options.augment))
    n_params = sum(p.numel() for p in readout.readout_parameters())
    done = len(out.read_metrics())
    log(f"{name}: readout variant {options.variant} at '{readout.layer}' reading "
        f"{', '.join(readout.readout_layers)} + logits ({n_params:,} parameters) on {device}")
    log(f"cost: {len(dataset):,} images × {options.epochs} epochs × 2 forwards = "
        f"{2 * len(dataset) * options.epochs:,} forwards (+ the backward from the logits to "
        f"'{readout.layer}' per image)" + (f"; {done} epochs done" if done else ""))
    steps_per_epoch = -(-len(dataset) // options.batch_size)  # the loader keeps the last batch
    history = train_readout(model, readout, _loader_factory(options, dataset, normalizer, device),
                            epochs=options.epochs, beta=options.beta, lr=options.lr,
                            device=device, out_dir=out.path, seed=options.seed,
                            progress=progress, log=log,
                            on_epoch=lambda h: (write_curves(out, h),
                                                log_epoch(out.logger, h, steps_per_epoch)),
                            logger=out.logger)
    write_curves(out, history)
    images = bundle.split("test")[0][0]
    training = {"data": bundle.info.spec, "epochs": options.epochs, "lr": options.lr,
                "batch_size": options.batch_size, "beta": options.beta, "seed": options.seed,
                "train_images": len(dataset), "augment": options.augment, "kind": options.kind,
                "statistics_samples": stats.logits.n, "final": history[-1]}
    path = save_readout(out.file(READOUT_FILE), readout, input_shape=tuple(images.shape),
                        card=card, checkpoint=checkpoint, training=training)
    result = ReadoutRun(path=path, history=history, training=training)
    out.write_json("results.json", {"summary": result.summary(), "model": name,
                                    "readout": str(path), **training})
    return result
