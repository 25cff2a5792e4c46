"""What ``--log tensorboard`` costs the training loop, measured side by side in one run.

off: ``narrows.training.train_one_epoch`` without a logger.
on: the same epoch with a TensorBoard logger (every step's loss and learning rate, gathered on
the device and written at the loop's existing looks at the loss).

Epochs alternate (off, on, off, on, ...) so that machine load hits both alike; the ratio of the
medians of images per second is printed. Target: >= 0.95.

    python benchmarks/logging_overhead.py [--model resnet20_cifar] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from narrows.data import load
from narrows.models import create
from narrows.runs.logger import TensorBoardLogger
from narrows.runtime import Distributed, set_threads
from narrows.training import (
    Normalizer,
    TrainSettings,
    epoch_loader,
    make_optimizer,
    train_one_epoch,
)
from narrows.training.loop import cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    threads = set_threads(args.threads)
    data = load(args.data)
    settings = TrainSettings(epochs=2 * args.repeats, batch_size=args.batch_size)
    normalizer = Normalizer(data.info.mean, data.info.std)
    model = create(args.model, num_classes=data.info.num_classes)
    optimizer = make_optimizer(model, settings)
    train_set = data.train(settings.augment)
    device = torch.device("cpu")

    with tempfile.TemporaryDirectory() as folder:
        logger = TensorBoardLogger(folder)
        speeds: dict[str, list[float]] = {"off": [], "on": []}
        for epoch in range(2 * args.repeats):
            mode = "on" if epoch % 2 else "off"
            loader = epoch_loader(train_set, settings, epoch, dist=Distributed(), pin=False)
            stats = train_one_epoch(model, loader, optimizer, settings, epoch, normalizer, device,
                                    cross_entropy(), logger=logger if mode == "on" else None)
            speeds[mode].append(stats.images_per_second)
        logger.close()
    off, on = (statistics.median(speeds[m]) for m in ("off", "on"))
    print(f"model {args.model}, data {args.data}, batch {args.batch_size}, {threads} threads, "
          f"{len(train_set)} images per epoch, {args.repeats} epochs each, alternating")
    for mode in ("off", "on"):
        print(f"logging {mode:3s}: {statistics.median(speeds[mode]):8.1f} img/s  "
              f"(runs: {', '.join(f'{v:.0f}' for v in speeds[mode])})")
    print(f"ratio (on / off): {on / off:.3f}   target >= 0.95")


if __name__ == "__main__":
    main()
