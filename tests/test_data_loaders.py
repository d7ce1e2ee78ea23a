"""create_dataloader: batches, reproducible seeded augmentation, distributed samplers, worker caps."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from data.loaders import BatchAlignedDistributedSampler, create_dataloader
from tests.data_fixtures import draw_boxes, no_augment_hyp, rect_dataset, write_sample, yolo_rows

HYP = no_augment_hyp(mosaic=1.0, translate=0.1, scale=0.5, fliplr=0.5, hsv_h=0.015, hsv_s=0.7, hsv_v=0.4)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return rect_dataset(tmp_path_factory.mktemp("loaders"), n_images=6, size=(96, 64))


def _epoch(loader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's batches, selected as the trainer does (sampler and dataset told the epoch)."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    return [(imgs.clone(), targets.clone()) for imgs, targets, _, _ in loader]


def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_training_batches_have_the_contracted_form(images):
    loader, dataset = create_dataloader(images, 64, 4, 32, hyp=HYP, augment=True, workers=0, shuffle=True)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.shape == (4, 3, 64, 64) and imgs.dtype == torch.uint8
    assert targets.ndim == 2 and targets.shape[1] == 6 and targets.dtype == torch.float32
    assert set(targets[:, 0].long().tolist()) <= {0, 1, 2, 3} and len(paths) == 4
    assert len(loader) == 2 and len(dataset) == 6


def test_same_seed_same_batches_in_process(images):
    runs = []
    for seed in (0, 0, 1):
        loader, _ = create_dataloader(images, 64, 3, 32, hyp=HYP, augment=True, shuffle=True, seed=seed,
                                      workers=0)
        runs.append([_epoch(loader, 0), _epoch(loader, 1)])
    assert _same(runs[0][0], runs[1][0]) and _same(runs[0][1], runs[1][1])
    assert not _same(runs[0][0], runs[0][1])  # epochs differ
    assert not _same(runs[0][0], runs[2][0])  # seeds differ


def test_an_epoch_does_not_depend_on_earlier_epochs(images):
    """What resume needs: a fresh loader asked for epoch 2 gives what an unbroken loader gives."""
    unbroken, _ = create_dataloader(images, 64, 3, 32, hyp=HYP, augment=True, shuffle=True, seed=5, workers=2)
    epochs = [_epoch(unbroken, e) for e in range(3)]
    fresh, _ = create_dataloader(images, 64, 3, 32, hyp=HYP, augment=True, shuffle=True, seed=5, workers=0)
    assert _same(_epoch(fresh, 2), epochs[2]) and not _same(epochs[1], epochs[2])


def test_same_seed_same_batches_with_worker_processes(images):
    runs = []
    for seed in (3, 3, 4):
        loader, _ = create_dataloader(images, 64, 3, 32, hyp=HYP, augment=True, shuffle=True, seed=seed,
                                      workers=2)
        assert loader.num_workers == min(2, torch.multiprocessing.cpu_count())
        runs.append(_epoch(loader))
        del loader
    assert _same(runs[0], runs[1]) and not _same(runs[0], runs[2])


def test_distributed_sampler_splits_the_dataset_between_ranks(images, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in (0, 1):
        loader, _ = create_dataloader(images, 64, 2, 32, hyp=HYP, augment=True, rank=rank, shuffle=True,
                                      workers=0)
        assert isinstance(loader.sampler, DistributedSampler)
        orders = []
        for epoch in range(4):  # the trainer's set_epoch reshuffles
            loader.sampler.set_epoch(epoch)
            orders.append(list(loader.sampler))
        assert any(order != orders[0] for order in orders[1:])
        seen.append(orders[0])
    assert sorted(seen[0] + seen[1]) == list(range(6)) and len(seen[0]) == 3


def test_rect_distributed_sampler_hands_out_whole_batches(tmp_path, monkeypatch):
    sizes = [(64, 32), (64, 32), (64, 64), (64, 64), (32, 64), (32, 64), (64, 48)]
    for k, (w, h) in enumerate(sizes):
        write_sample(tmp_path, "val", f"{k}.png", draw_boxes(w, h, [(2, 2, 20, 20)], [0]),
                     yolo_rows([(2, 2, 20, 20)], [0], w, h))  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    batches_seen = []
    for rank in (0, 1):
        loader, _ = create_dataloader(tmp_path / "images" / "val", 64, 2, 32, rect=True, rank=rank, workers=0)
        assert isinstance(loader.sampler, BatchAlignedDistributedSampler)
        for imgs, _, _, _ in loader:  # collate would fail on mixed shapes
            assert imgs.shape[0] in (1, 2)
        batches_seen += loader.sampler.mine
    # 4 batches (2+2+2+1) over 2 ranks: every dataset batch is handed out whole
    assert sorted(map(tuple, batches_seen)) == [(0, 1), (2, 3), (4, 5), (6,)]


def test_batch_aligned_sampler_pads_to_equal_lengths():
    parts = [BatchAlignedDistributedSampler(10, 4, 3, rank) for rank in range(3)]
    assert [p.mine for p in parts] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]]]
    parts = [BatchAlignedDistributedSampler(10, 2, 3, rank) for rank in range(3)]
    assert [len(p.mine) for p in parts] == [2, 2, 2]  # 5 batches padded to 6
    assert list(parts[2]) == [4, 5, 0, 1]


def test_workers_are_capped_by_batch_size(images):
    loader, _ = create_dataloader(images, 64, 1, 32, workers=8)
    assert loader.num_workers == 0  # batch of one: no worker processes
    loader, _ = create_dataloader(images, 64, 2, 32, workers=8)
    assert loader.num_workers <= 2


def test_rect_turns_off_shuffle_with_a_warning(images, caplog):
    loader, _ = create_dataloader(images, 64, 2, 32, rect=True, shuffle=True, workers=0)
    assert "incompatible with DataLoader shuffle" in caplog.text
    paths = [p for _, _, batch_paths, _ in loader for p in batch_paths]
    assert paths == [p for _, _, batch_paths, _ in loader for p in batch_paths]  # fixed order
