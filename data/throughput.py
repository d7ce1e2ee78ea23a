"""Training-loader throughput (images/s) with mosaic and the rest of the training augmentation.

    python -m data.throughput --data bccd.yaml --imgsz 640 --batch-size 16 --workers 2 --batches 20
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time

from data.config import check_dataset
from data.loaders import create_dataloader

WARMUP_BATCHES = 2  # worker start-up and first image reads are not throughput


def _batches_forever(loader):
    """Batches over as many epochs as needed (a small dataset has fewer batches than measured)."""
    for epoch in itertools.count():
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader


def loader_throughput(
    data: str | dict,
    imgsz: int = 640,
    batch_size: int = 16,
    workers: int = 2,
    batches: int = 20,
    hyp: dict | None = None,
) -> float:
    """Images per second delivered by the training loader of ``data``'s train split.

    Training augmentation is on (mosaic with hyp['mosaic'], default hyp.scratch-low.yaml where it
    is 1.0); the first WARMUP_BATCHES batches are not timed; ``batches`` batches are.
    """
    cfg = check_dataset(data)
    loader, _ = create_dataloader(
        cfg["train"], imgsz, batch_size, stride=32, hyp=hyp, augment=True, workers=workers,
        shuffle=True, names=cfg["names"], prefix="throughput: ",
    )  # fmt: skip
    stream = _batches_forever(loader)
    for _ in range(WARMUP_BATCHES):
        next(stream)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(stream)[0])
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="builtin.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rate = loader_throughput(args.data, args.imgsz, args.batch_size, args.workers, args.batches)
    print(
        f"loader throughput: {rate:.1f} images/s (data={args.data}, imgsz={args.imgsz}, "
        f"batch={args.batch_size}, workers={args.workers}, {args.batches} batches, mosaic on)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
