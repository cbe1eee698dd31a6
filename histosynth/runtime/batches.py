"""The batch stream of a training loop: endless, in a data order fixed by (seed, epoch), resumable mid-epoch."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from histosynth.runtime import dist


def resumable_batches(loader: torch.utils.data.DataLoader, sampler: dist.ResumableSampler, epoch: int = 0,
                      position: int = 0) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(epoch, position, batch)`` forever, starting `position` samples into `epoch`.

    `position` is how many samples of the epoch this rank has consumed *after* the batch: store it in
    `TrainState.epoch_position` with the epoch, and a resumed run continues with the next unseen batch (a
    position at the end of an epoch continues with the next epoch). `loader` must iterate `sampler` (a
    `ResumableSampler`) and yield tensors (or tuples of them) whose first dimension is the batch. Give the
    loader its own ``generator``: without one, each pass draws a worker seed from the global torch RNG and
    shifts the training stream of a resumed run against an uninterrupted one.
    """
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(position)
        for batch in loader:
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            position += int(first.shape[0])
            yield epoch, position, batch
        epoch, position = epoch + 1, 0
