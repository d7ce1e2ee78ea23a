"""DataLoaders for training and validation: DDP samplers, seeded workers (YOLOv5's create_dataloader).

Reproducibility: the shuffle order is a function of (seed, epoch) (a DistributedSampler, one replica
when not distributed; the trainer calls ``set_epoch``) and each sample's augmentation stream is a
function of (seed, epoch, index) (see LoadImagesAndLabels.__getitem__). Nothing depends on which worker
loads a sample or on earlier epochs, so a run resumed from a checkpoint sees exactly the batches an
unbroken run sees. Workers are re-created each epoch so they see the dataset's current epoch.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from data.dataset import LoadImagesAndLabels

LOGGER = logging.getLogger(f"vitdet.{__name__}")
GENERATOR_OFFSET = 6148914691236517205  # YOLOv5's constant: keeps loader seeds clear of small user seeds


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed the global generators of a worker (augmentation itself uses the dataset's
    per-sample streams) and keep cv2 single-threaded."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(0)  # the worker is the unit of parallelism; cv2's own threads oversubscribe


class BatchAlignedDistributedSampler(Sampler):
    """Distributes whole batches: rank r gets batches r, r + W, r + 2W, ... in order.

    Rectangular batches need this: every image of a batch is letterboxed to that batch's shape, so
    a rank's batch must be one of the dataset's batches, not an interleaved mix. The batch list is
    padded with batches from the start so every rank gets the same number (like DistributedSampler).
    """

    def __init__(self, dataset_len: int, batch_size: int, num_replicas: int, rank: int):
        self.batches = [
            list(range(b, min(b + batch_size, dataset_len))) for b in range(0, dataset_len, batch_size)
        ]
        per_rank = math.ceil(len(self.batches) / num_replicas)
        padded = self.batches + self.batches[: per_rank * num_replicas - len(self.batches)]
        self.mine = padded[rank::num_replicas]
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        return (i for batch in self.mine for i in batch)

    def __len__(self) -> int:
        return sum(len(b) for b in self.mine)

    def set_epoch(self, epoch: int) -> None:
        """Kept for the trainer's loop; the order is fixed (rectangular batches are never shuffled)."""
        self.epoch = epoch


def _world_and_rank(rank: int) -> tuple[int, int]:
    """(world size, global rank): from the process group when there is one (the caller may pass a
    local rank, which differs on several nodes), else from WORLD_SIZE and the rank given."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", 1)), rank


def _sampler(dataset: LoadImagesAndLabels, batch_size: int, rank: int, shuffle: bool, rect: bool, seed: int):
    """A sampler whose order is a function of (seed, epoch) via set_epoch, so resumed runs see the same
    order; a single process uses a one-replica DistributedSampler for that (None when not shuffling)."""
    if rank == -1:
        return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed) if shuffle else None
    world, rank = _world_and_rank(rank)
    if rect:
        return BatchAlignedDistributedSampler(len(dataset), batch_size, world, rank)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)


def create_dataloader(
    path: str | Path | list,
    imgsz: int,
    batch_size: int,
    stride: int,
    single_cls: bool = False,
    hyp: dict | None = None,
    augment: bool = False,
    cache: bool | str = False,
    pad: float = 0.0,
    rect: bool = False,
    rank: int = -1,
    workers: int = 8,
    prefix: str = "",
    shuffle: bool = False,
    seed: int = 0,
    names: list[str] | None = None,
    names_source: str | None = None,
    image_weights: bool = False,
    quad: bool = False,
) -> tuple[DataLoader, LoadImagesAndLabels]:
    """(DataLoader, dataset) for one dataset source; batches are LoadImagesAndLabels.collate_fn's
    (collate_fn4's with quad: every 4 images become one at twice the size, as YOLOv5's --quad).

    image_weights: the caller redraws ``dataset.indices`` each epoch (the trainer's --image-weights);
    it needs shuffled, non-rectangular batches.

    names_source (the dataset YAML the names came from) is named when the labels' class ids do not fit.
    rank != -1 uses a distributed sampler (call ``loader.sampler.set_epoch(epoch)`` each epoch);
    batch_size is per process. Workers are capped by CPUs per GPU and by the batch size.
    """
    if image_weights and rect:
        raise ValueError(f"{prefix}image weights redraw the images each epoch; they cannot use --rect "
                         "batches")
    if rect and shuffle:
        LOGGER.warning(f"{prefix}--rect is incompatible with DataLoader shuffle, setting shuffle=False")
        shuffle = False
    seed_offset = _world_and_rank(rank)[1] if rank != -1 else 0  # each process its own streams
    dataset = LoadImagesAndLabels(
        path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, cache_images=cache,
        single_cls=single_cls, stride=int(stride), pad=pad, prefix=prefix, names=names,
        names_source=names_source,
        seed=seed + seed_offset,
    )  # fmt: skip
    batch_size = min(batch_size, len(dataset))
    sampler = _sampler(dataset, batch_size, rank, shuffle, rect, seed)
    return _loader(dataset, batch_size, sampler, shuffle, workers, quad, seed + seed_offset), dataset


def _worker_count(batch_size: int, workers: int) -> int:
    """Workers capped by the CPUs per GPU and by the batch size (none for batches of one)."""
    devices = max(torch.cuda.device_count(), 1)
    return min((os.cpu_count() or 1) // devices, batch_size if batch_size > 1 else 0, workers)


def _loader(dataset: LoadImagesAndLabels, batch_size: int, sampler, shuffle: bool, workers: int, quad: bool,
            seed: int) -> DataLoader:
    """The DataLoader over `dataset`, its worker seeds a function of `seed` (this process's seed)."""
    generator = torch.Generator()
    generator.manual_seed(GENERATOR_OFFSET + seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=_worker_count(batch_size, workers),
        pin_memory=torch.cuda.is_available(),
        collate_fn=LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=False,  # fresh workers each epoch see the dataset's current epoch
    )
