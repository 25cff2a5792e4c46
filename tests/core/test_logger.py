"""Experiment logging: TensorBoard event files read back, W&B through a stand-in module, and
the training loops' logging through a run's logger."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

from narrows.errors import UserError
from narrows.runs import RunDir
from narrows.runs.logger import (
    LOG_CHOICES,
    LogOptions,
    RunLogger,
    TensorBoardLogger,
    open_logger,
)


def _figure():
    from narrows.plotting import pyplot

    fig, ax = pyplot().subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [2, 1, 3])
    return fig


def _events(directory: Path):
    """The event accumulator of the TensorBoard files in ``directory``, loaded."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(Path(directory).glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0,
                                                           "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# -- TensorBoard ------------------------------------------------------------------------------

def test_tensorboard_scalars_figure_and_config_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from narrows.plotting import pyplot

    logger = open_logger("tensorboard", tmp_path, config={"lr": 0.1, "model": "resnet"})
    assert isinstance(logger, TensorBoardLogger) and logger.active
    logger.scalars({"loss": 2.5, "lr": 0.1}, 0, prefix="train")
    logger.scalars({"loss": 1.25, "lr": 0.05, "note": "text", "flag": True,
                    "bad": float("nan"), "tensor": torch.tensor(0.75)}, 1, prefix="train")
    logger.scalars({"test_top1": 0.5}, 1, prefix="epoch")
    fig = _figure()
    logger.figure("curves", fig, 1)
    assert pyplot().fignum_exists(fig.number)  # the caller's figure stays open
    pyplot().close(fig)
    logger.close()
    logger.close()  # idempotent
    logger.scalars({"loss": 9.0}, 2, prefix="train")  # after close: ignored, no error

    acc = _events(tmp_path / "tensorboard")
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr", "train/tensor", "epoch/test_top1"}
    assert _scalars(acc, "train/loss") == [(0, 2.5), (1, 1.25)]
    assert [s for s, _ in _scalars(acc, "train/lr")] == [0, 1]
    assert [v for _, v in _scalars(acc, "train/lr")] == pytest.approx([0.1, 0.05])
    assert _scalars(acc, "train/tensor") == [(1, 0.75)]
    assert _scalars(acc, "epoch/test_top1") == [(1, 0.5)]
    assert tags["images"] == ["curves"]
    image = acc.Images("curves")
    assert [e.step for e in image] == [1] and image[0].width > 50 and image[0].height > 50
    text = [t for t in tags["tensors"] if t.startswith("config")]
    assert text
    shown = acc.Tensors(text[0])[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.1" in shown and "model: resnet" in shown


def test_null_logger_writes_nothing(tmp_path):
    logger = open_logger(None, tmp_path / "run", config={"a": 1})
    assert type(logger) is RunLogger and not logger.active
    logger.scalars({"loss": 1.0}, 0)
    logger.figure("f", object(), 0)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_unknown_kind_names_the_choices(tmp_path):
    with pytest.raises(UserError, match="`log`") as info:
        open_logger("mlflow", tmp_path)
    assert all(choice in str(info.value) for choice in LOG_CHOICES)
    with pytest.raises(UserError, match="`log`"):
        RunDir(tmp_path / "run").attach_logger("mlflow")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", LOG_CHOICES)
def test_missing_package_names_its_extra(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, kind, None)  # import of it fails
    with pytest.raises(UserError, match=rf"narrows\[{kind}\]"):
        open_logger(kind, tmp_path)
    with pytest.raises(UserError, match=rf"narrows\[{kind}\]"):  # every rank checks it
        RunDir(tmp_path / "rank1", writer=False).attach_logger(kind)
    assert not (tmp_path / "tensorboard").exists()


def test_log_options_are_off_by_default_and_do_not_affect_results():
    import dataclasses

    from narrows.config import convert

    options = LogOptions()
    assert options.log is None and options.log_project == "narrows"
    for f in dataclasses.fields(LogOptions):
        assert f.metadata["affects_result"] is False
    assert convert(LogOptions, "log", "wandb") == "wandb"
    with pytest.raises(UserError, match="tensorboard, wandb"):
        convert(LogOptions, "log", "mlflow")


# -- W&B through a stand-in -------------------------------------------------------------------

class FakeWandb(types.ModuleType):
    """Records what narrows asks of ``wandb``."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits, self.logs, self.metrics, self.finished = [], [], [], 0
        fake = self

        class Image:
            def __init__(self, fig):
                self.fig = fig

        class Config(dict):
            def update(self, values, allow_val_change=False):
                super().update(values)

        class Run:
            def __init__(self, config):
                self.config = Config(config or {})

            def finish(self):
                fake.finished += 1

        self.Image, self._Run = Image, Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.run = self._Run(kwargs.get("config"))
        return self.run

    def define_metric(self, name, **kwargs):
        self.metrics.append((name, kwargs))

    def log(self, values, step=None, commit=None):
        assert step is None  # narrows passes its step as a value
        self.logs.append(dict(values))


def test_wandb_logs_through_the_module_and_resumes_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = open_logger("wandb", tmp_path, config={"lr": 0.1}, name="exp", project="proj")
    logger.scalars({"loss": 0.5, "text": "no", "inf": math.inf}, 3, prefix="train")
    fig = _figure()
    logger.figure("curves", fig, 1)
    logger.close()
    logger.close()
    assert fake.finished == 1
    (init,) = fake.inits
    assert init["project"] == "proj" and init["name"] == "exp"
    assert init["config"] == {"lr": 0.1} and init["dir"] == str(tmp_path)
    assert init["resume"] == "allow" and init["id"]
    # each prefix has its own x axis: epochs are not drawn against optimisation steps
    assert ("train/*", {"step_metric": "train/step"}) in fake.metrics
    assert fake.logs[0] == {"train/loss": 0.5, "train/step": 3}
    assert fake.logs[1]["step"] == 1 and isinstance(fake.logs[1]["curves"], fake.Image)
    assert fake.logs[1]["curves"].fig is fig
    assert "WANDB_MODE" not in __import__("os").environ

    logger = open_logger("wandb", tmp_path)
    logger.scalars({"test_top1": 0.9, "loss": 0.4}, 2, prefix="epoch")
    logger.scalars({"loss": 0.3}, 40, prefix="train")
    assert fake.logs[-2:] == [{"epoch/test_top1": 0.9, "epoch/loss": 0.4, "epoch/step": 2},
                              {"train/loss": 0.3, "train/step": 40}]
    assert ("epoch/*", {"step_metric": "epoch/step"}) in fake.metrics
    logger.close()

    # a second open of the same run directory continues the same W&B run; another does not
    open_logger("wandb", tmp_path, config={"lr": 0.1}).close()
    open_logger("wandb", tmp_path / "other").close()
    ids = [i["id"] for i in fake.inits]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert fake.inits[2]["name"] == tmp_path.name  # the directory's name by default


def test_wandb_that_cannot_start_is_one_line_and_keeps_no_run_id(tmp_path, monkeypatch):
    fake = FakeWandb()

    def refuse(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.\nmore")

    fake.init = refuse
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(UserError) as caught:
        open_logger("wandb", tmp_path)
    assert "No API key configured" in caught.value.what and "more" not in caught.value.what
    assert "WANDB_MODE=offline" in caught.value.fix
    assert not (tmp_path / "wandb_id.txt").exists()


def test_run_dir_attaches_claims_and_closes(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = RunDir.open(tmp_path / "run", "train", {"lr": 0.2}, {"lr": 0.2})
    assert not run.logger.active and not (tmp_path / "run").exists()
    logger = run.attach_logger("wandb", project="p")
    # nothing is written or started before the first value: a refused command leaves nothing
    assert run.logger is logger and not (tmp_path / "run").exists() and not fake.inits
    logger.scalars({"loss": 1.0}, 0, prefix="train")
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert fake.inits[0]["config"] == {"lr": 0.2}  # the run's options by default
    run.close()
    run.close()
    assert fake.finished == 1
    # the run keeps its logger: used again (a second fit), it continues the same W&B run
    logger.scalars({"loss": 0.5}, 1, prefix="train")
    run.close()
    assert len(fake.inits) == 2 and fake.inits[0]["id"] == fake.inits[1]["id"]
    assert fake.finished == 2
    # a non-writing rank opens nothing
    other = RunDir(tmp_path / "rank1", writer=False)
    assert not other.attach_logger("wandb").active and len(fake.inits) == 2


# -- the loops --------------------------------------------------------------------------------

def _tiny_fit(run, epochs=2):
    from narrows.data import DataBundle, TensorImageDataset, load
    from narrows.data.augment import tensor_augmentation
    from narrows.models import ModelCard, create
    from narrows.training import TrainSettings, fit

    torch.set_num_threads(1)
    full = load("digits")
    train, test = full.train("none"), full.test()
    tr = TensorImageDataset(train.images[:24], train.labels[:24])
    te = TensorImageDataset(test.images[:16], test.labels[:16])
    info = full.info

    def factory(base):
        return lambda augment: base.with_transform(tensor_augmentation("none", info.image_size))

    data = DataBundle(info, {"train": factory(tr), "test": factory(te)})
    card = ModelCard(architecture="resnet20_cifar", num_classes=10, in_chans=3,
                     input_size=info.image_size, mean=info.mean, std=info.std,
                     data_spec=info.spec)
    torch.manual_seed(0)
    model = create("resnet20_cifar", num_classes=10)
    settings = TrainSettings(epochs=epochs, batch_size=8, lr=0.05, augment="none")
    return fit(model, data, settings, card=card, device=torch.device("cpu"), run=run,
               progress=False, log=lambda _: None)


def test_fit_logs_every_step_and_epoch_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir.open(tmp_path / "run", "train", {"epochs": 2}, {"epochs": 2})
    logger = run.attach_logger("tensorboard")
    result = _tiny_fit(run)
    assert run.logger is logger and logger.backend is None  # fit closed its backend

    acc = _events(tmp_path / "run" / "tensorboard")
    losses = _scalars(acc, "train/loss")
    assert [s for s, _ in losses] == list(range(6))  # 24 images / 8 per step × 2 epochs
    assert all(math.isfinite(v) and v > 0 for _, v in losses)
    lrs = [v for _, v in _scalars(acc, "train/lr")]
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] < lrs[0]  # the cosine schedule
    top1 = _scalars(acc, "epoch/test_top1")
    assert [s for s, _ in top1] == [2, 5]  # each epoch at its last step (3 steps an epoch)
    assert [v for _, v in top1] == pytest.approx([r["test_top1"] for r in result.metrics])
    train_loss = [v for _, v in _scalars(acc, "epoch/train_loss")]
    assert train_loss == pytest.approx([r["train_loss"] for r in result.metrics])
    # the epoch's mean loss is the mean of its steps' losses (all batches of 8)
    assert train_loss[0] == pytest.approx(sum(v for _, v in losses[:3]) / 3, rel=1e-5)
    assert [e.step for e in acc.Images("curves")] == [2, 5]
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])


def test_a_resumed_fit_replaces_what_the_killed_run_logged_of_its_unfinished_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir.open(tmp_path / "run", "train", {}, {})
    run.attach_logger("tensorboard")
    _tiny_fit(run, epochs=1)  # epoch 1 finished: steps 0-2
    killed = run.attach_logger("tensorboard")  # the killed run's epoch 2: two steps logged
    killed.scalars({"loss": 999.0}, 3, prefix="train")
    killed.scalars({"loss": 999.0}, 4, prefix="train")
    killed.close()
    run.attach_logger("tensorboard")
    _tiny_fit(run, epochs=2)  # resumes after epoch 1 and redoes epoch 2: steps 3-5

    events = _events(tmp_path / "run" / "tensorboard")
    losses = _scalars(events, "train/loss")
    assert [s for s, _ in losses] == list(range(6))
    assert 999.0 not in [v for _, v in losses]
    assert len(events.Tensors("config/text_summary")) == 1  # written once, not per resume


def test_a_finished_fit_given_a_logger_again_writes_no_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir.open(tmp_path / "run", "train", {}, {})
    _tiny_fit(run, epochs=1)
    run.attach_logger("tensorboard")
    _tiny_fit(run, epochs=1)  # nothing left to train: no curve point, so no config-only file
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_fit_without_logger_writes_no_tensorboard(tmp_path):
    run = RunDir.open(tmp_path / "run", "train", {}, {})
    _tiny_fit(run, epochs=1)
    assert (tmp_path / "run" / "last.pt").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert not list((tmp_path / "run").glob("wandb*"))


def test_ssl_pretraining_logs_steps_and_epochs(tmp_path):
    pytest.importorskip("tensorboard")
    from narrows.ssl import trainer
    from narrows.ssl.options import SSLOptions

    torch.set_num_threads(1)
    options = SSLOptions.from_preset("smoke", knn=False, epochs=2)
    run = RunDir(tmp_path / "ssl")
    logger = run.attach_logger("tensorboard")
    result = trainer.pretrain(options, "shapes:classes=2,size=32,train=32,test=16", run=run,
                              progress=False, say=lambda *a: None)
    assert logger.backend is None  # closed; it opens again if the run trains again
    acc = _events(tmp_path / "ssl" / "tensorboard")
    steps = len(_scalars(acc, "train/loss"))
    assert steps >= 2 and steps % 2 == 0
    assert [s for s, _ in _scalars(acc, "train/loss")] == list(range(steps))
    for name in ("lr", "momentum", "teacher_temp"):
        assert len(_scalars(acc, f"train/{name}")) == steps
    epoch_loss = _scalars(acc, "epoch/loss")
    assert [s for s, _ in epoch_loss] == [steps // 2 - 1, steps - 1]
    assert [v for _, v in epoch_loss] == pytest.approx([r["loss"] for r in result.metrics])
    per_epoch = steps // 2
    first = [v for _, v in _scalars(acc, "train/loss")[:per_epoch]]
    assert epoch_loss[0][1] == pytest.approx(sum(first) / per_epoch, rel=1e-5)
    assert [e.step for e in acc.Images("loss")] == [steps - 1]


class Recorder(RunLogger):
    """Keeps what is logged: ``(tag, step, value)`` and ``(figure tag, step)``."""

    active = True

    def __init__(self) -> None:
        super().__init__()
        self.values, self.figures = [], []

    def _scalars(self, values, step):
        self.values += [(tag, step, value) for tag, value in values.items()]

    def _figure(self, tag, fig, step):
        self.figures.append((tag, step))


def test_readout_curves_are_logged_at_the_epoch_s_last_step():
    from narrows.attribution.readout_training import log_epoch
    from narrows.plotting import pyplot

    history = [{"epoch": 1, "loss": 3.0, "ce": 2.0, "capacity": 0.5, "samples": 32},
               {"epoch": 2, "loss": 2.0, "ce": 1.5, "capacity": 0.25, "samples": 32}]
    recorder, before = Recorder(), len(pyplot().get_fignums())
    log_epoch(recorder, history, steps_per_epoch=4)
    assert recorder.values == []  # the numbers are train_readout's to log
    assert recorder.figures == [("readout_curves", 7)]  # the last step of epoch 2
    assert len(pyplot().get_fignums()) == before  # its own figure is closed


def test_kvb_results_are_logged_per_phase_and_task():
    from narrows.kvb.continual import log_result
    from narrows.kvb.results import ContinualResult

    result = ContinualResult(model="dkvb", protocol="incremental", tasks=[[0, 1], [2, 3]],
                             per_class=[[1.0, 0.5, 0.0, 0.0], [0.5, 0.5, 1.0, 1.0]],
                             visits=[10, 10], meta={"mean_loss_phase1": 0.7,
                                                    "mean_loss_phase2": 0.4})
    recorder = Recorder()
    log_result(recorder, result)
    got = {(tag, step): value for tag, step, value in recorder.values}
    assert got[("dkvb-incremental/task1", 1)] == pytest.approx(0.75)
    assert got[("dkvb-incremental/task2", 1)] == pytest.approx(0.0)
    assert got[("dkvb-incremental/task1", 2)] == pytest.approx(0.5)
    assert got[("dkvb-incremental/accuracy", 1)] == pytest.approx(0.375)
    assert got[("dkvb-incremental/mean_loss", 2)] == pytest.approx(0.4)
    assert got[("final/dkvb-incremental/accuracy", 2)] == pytest.approx(0.75)
    assert got[("final/dkvb-incremental/forgetting", 2)] == pytest.approx(0.25)
    assert got[("final/dkvb-incremental/task2", 2)] == pytest.approx(1.0)


def test_a_run_trained_twice_logs_both_times(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir.open(tmp_path / "run", "train", {}, {})
    run.attach_logger("tensorboard")
    _tiny_fit(run, epochs=1)
    _tiny_fit(run, epochs=2)  # staged training from Python: the second fit logs too
    losses = _scalars(_events(tmp_path / "run" / "tensorboard"), "train/loss")
    assert [s for s, _ in losses] == list(range(6))


def test_a_command_refused_before_training_leaves_nothing_with_log(tmp_path, capsys):
    from narrows.cli import main

    out = tmp_path / "csg"
    assert main(["train", "--resume", "--data", "shapes:classes=2,size=16,train=8,test=8",
                 "--out", str(out), "--log", "tensorboard", "--threads", "1",
                 "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err and not out.exists()


def test_a_resume_keeps_finished_epochs_when_an_epoch_is_one_step(tmp_path):
    pytest.importorskip("tensorboard")
    from narrows.runs.logger import TensorBoardLogger

    killed = TensorBoardLogger(tmp_path)
    for epoch in range(3):  # one step an epoch; the third epoch's row came before the kill
        killed.scalars({"loss": 1.0 + epoch}, epoch, prefix="train")
        killed.scalars({"top1": 0.1 * (epoch + 1)}, epoch, prefix="epoch")
    killed.close()
    resumed = TensorBoardLogger(tmp_path)
    resumed.resume_at(2)  # two epochs were checkpointed
    resumed.scalars({"loss": 9.0}, 2, prefix="train")
    resumed.scalars({"top1": 0.9}, 2, prefix="epoch")
    resumed.close()
    acc = _events(tmp_path)
    assert _scalars(acc, "epoch/top1") == [(0, pytest.approx(0.1)), (1, pytest.approx(0.2)),
                                           (2, pytest.approx(0.9))]
    assert [v for _, v in _scalars(acc, "train/loss")] == [1.0, 2.0, 9.0]

