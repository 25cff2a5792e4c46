"""Training-loop throughput against the bare model, measured side by side in one run.

ours: ``narrows.training.train_one_epoch`` over the digits train split (data loading,
augmentation, normalisation, the schedule, optimizer step and metrics included).
bare: forward + loss + backward of the same model and batch size on pre-loaded, pre-normalised
tensors, nothing else.
logged: ours with a TensorBoard logger (``--log tensorboard``: every step's loss and learning
rate, kept on the device and written at the loop's existing looks at the loss).

The three are interleaved (bare, ours, logged, bare, ...) so that machine load hits them alike;
the ratios of medians are printed. Targets: ours / bare >= 0.9, logged / ours >= 0.95.

    python benchmarks/train_throughput.py [--model resnet20_cifar] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from narrows.data import load
from narrows.models import create
from narrows.runtime import set_threads
from narrows.training import (
    Normalizer,
    TrainSettings,
    epoch_loader,
    make_optimizer,
    train_one_epoch,
)
from narrows.training.loop import cross_entropy


def bare_epoch(model, batches) -> float:
    """Images per second of forward + loss + backward on pre-loaded tensors."""
    model.train()
    n = 0
    start = time.perf_counter()
    for inputs, labels in batches:
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        n += labels.shape[0]
    return n / (time.perf_counter() - start)


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
    settings = TrainSettings(epochs=2 * args.repeats + 1, batch_size=args.batch_size)
    normalizer = Normalizer(data.info.mean, data.info.std)
    model = create(args.model, num_classes=data.info.num_classes)
    optimizer = make_optimizer(model, settings)
    device = torch.device("cpu")
    train_set = data.train(settings.augment)

    # The bare loop sees the same images, batch size and count, already normalised in memory.
    images = torch.stack([train_set[i][0] for i in range(len(train_set))])
    labels = torch.tensor(train_set.targets)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    batches = [(normalizer(images[idx]), labels[idx]) for idx in perm.split(args.batch_size)]
    if batches[-1][1].shape[0] == 1:
        batches.pop()

    from narrows.runs.logger import TensorBoardLogger

    bare_epoch(model, batches[:3])  # warm-up
    ours, bare, logged = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        logger = TensorBoardLogger(folder)
        for repeat in range(args.repeats):
            bare.append(bare_epoch(model, batches))
            for epoch, log, speeds in ((2 * repeat, None, ours), (2 * repeat + 1, logger, logged)):
                loader = epoch_loader(train_set, settings, epoch, dist=_single(), pin=False)
                stats = train_one_epoch(model, loader, optimizer, settings, epoch, normalizer,
                                        device, cross_entropy(), logger=log)
                speeds.append(stats.images_per_second)
        logger.close()
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"model {args.model}, data {args.data}, batch {args.batch_size}, {threads} threads, "
          f"{len(train_set)} images per epoch, {args.repeats} interleaved epochs")
    print(f"bare forward+backward : {statistics.median(bare):8.1f} img/s  "
          f"(runs: {', '.join(f'{v:.0f}' for v in bare)})")
    print(f"narrows training loop : {statistics.median(ours):8.1f} img/s  "
          f"(runs: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"with --log tensorboard: {statistics.median(logged):8.1f} img/s  "
          f"(runs: {', '.join(f'{v:.0f}' for v in logged)})")
    print(f"ratio (ours / bare)   : {ratio:.3f}   target >= 0.9")
    print(f"ratio (logged / ours) : {statistics.median(logged) / statistics.median(ours):.3f}   "
          "target >= 0.95")


def _single():
    from narrows.runtime import Distributed

    return Distributed()


if __name__ == "__main__":
    main()
