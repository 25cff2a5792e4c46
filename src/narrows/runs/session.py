"""A narrows job's session: the options every command has (output place, device, threads,
seed, progress), those of every analysis of a trained model (:class:`SubjectOptions`), and the
process set up from them: device, torchrun's process group, threads, seeds, and the run
directory opened on rank 0. The command line starts every command with :func:`start`; a Python
user can do the same with any option dataclass that has these fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from narrows.config import non_negative, option, positive, seed_range

if TYPE_CHECKING:
    import torch

    from narrows.models.subject import Subject
    from narrows.runs import RunDir
    from narrows.runtime import Distributed

COMMON = "common options"


@dataclass
class CommonOptions:
    """Mixed into every command's config (dataclass inheritance)."""

    out: str | None = option(None, "output directory (re-running on it resumes) "
                             "[default: runs/COMMAND/...]", metavar="DIR", affects_result=False,
                             group=COMMON)
    overwrite: bool = option(False, "start afresh in --out even if it holds a run made with "
                             "other options", affects_result=False, group=COMMON)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", affects_result=False,
                         group=COMMON)
    threads: int = option(0, "torch CPU threads; 0 = the cores available, split among torchrun "
                          "processes", affects_result=False, check=non_negative, group=COMMON)
    seed: int = option(0, "random seed: data order, augmentation, initialisation",
                       check=seed_range, group=COMMON)
    progress: bool = option(True, "show progress bars", affects_result=False, group=COMMON)

    def inherited(self, out: Path | str | None = None) -> dict[str, Any]:
        """The options a sub-command started from this one takes over (device, threads, seed,
        progress), with its own ``out``."""
        return {"out": None if out is None else str(out), "device": self.device,
                "threads": self.threads, "seed": self.seed, "progress": self.progress}


@dataclass
class Session:
    """What a command runs with."""

    device: torch.device
    dist: Distributed
    threads: int

    def say(self, *args: Any) -> None:
        """Print on rank 0 only (every process runs the same command under torchrun)."""
        if self.dist.is_main:
            print(*args)

    def close(self) -> None:
        """Leave torchrun's process group, if this process joined one."""
        from narrows.runtime import shutdown_distributed

        shutdown_distributed()

    def open(self, cfg: Any, command: str, *default: str | None) -> RunDir:
        """:func:`open_run` with the default directory ``default_out(*default)``."""
        from narrows.runs import default_out

        return open_run(cfg, command, default_out(*default), self)

    def done(self, *lines: str) -> int:
        """Say ``lines`` (where the results are), close, and give the exit code 0."""
        for line in lines:
            self.say(line)
        self.close()
        return 0


def start(cfg: CommonOptions) -> Session:
    """Pick the device, join torchrun's process group if any, set threads and the base seed."""
    from narrows.runtime import init_distributed, resolve_device, seed_everything, set_threads

    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    threads = set_threads(cfg.threads, dist.local_world_size)
    seed_everything(cfg.seed)
    return Session(device=device, dist=dist, threads=threads)


def open_run(cfg: Any, command: str, default: Path, session: Session) -> RunDir:
    """Open ``cfg.out`` (or ``default``) for ``command``.

    Under torchrun, rank 0 checks and writes; its verdict is broadcast so every rank either
    proceeds or fails with the same message (no rank is left waiting at a barrier).
    """
    from narrows import config as cfgmod
    from narrows.errors import UserError
    from narrows.runs import RunDir

    out = Path(cfg.out) if cfg.out else default

    def open_() -> RunDir:
        run = RunDir.open(out, command, cfgmod.to_dict(cfg), cfgmod.result_fields(cfg),
                          overwrite=cfg.overwrite)
        if getattr(cfg, "log", None):  # --log (LogOptions): the run's logger travels with it
            run.attach_logger(cfg.log, project=cfg.log_project)
        return run

    if not session.dist.enabled:
        return open_()
    import torch.distributed as tdist

    verdict: list[Any] = [None]
    opened = None  # rank 0's run: it writes the config with its first file
    if session.dist.is_main:
        try:
            opened = open_()
        except UserError as exc:
            verdict[0] = (exc.what, exc.fix)
    tdist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise UserError(*verdict[0])
    return opened if opened is not None else RunDir(out, writer=False)


@dataclass
class SubjectOptions:
    """Which model, on which data: the options of commands that analyse a trained model."""

    checkpoint: str | None = option(None, "model weights; a narrows checkpoint carries its "
                                    "architecture, classes, normalisation and data", metavar="FILE")
    model: str | None = option(None, "architecture (timm name); without --checkpoint: random "
                               "initial weights from --seed", short="-m")
    data: str | None = option(None, "data spec [default: the checkpoint's data]", short="-d")
    image_size: int | None = option(None, "served image size for imagenet:/folder: data",
                                    check=positive)

    def load_subject(self) -> Subject:
        """The model and data these options name (:func:`narrows.models.subject.load_subject`)."""
        from narrows.models.subject import load_subject

        return load_subject(self.checkpoint, self.model, self.data, self.image_size)
