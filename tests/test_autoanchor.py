"""AutoAnchor: BPR metric, k-means + evolution, anchor order (YOLOv5 semantics)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from utils.autoanchor import (
    best_possible_recall,
    check_anchor_order,
    check_anchors,
    kmean_anchors,
    kmeans,
    label_wh,
    ratio_metric,
)

STRIDES = (8.0, 16.0, 32.0)
YOLOV5_ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


class FakeDetect(nn.Module):
    def __init__(self, anchors_px: list):
        super().__init__()
        stride = torch.tensor(STRIDES)
        self.register_buffer("stride", stride)
        pixels = torch.tensor(anchors_px, dtype=torch.float32).view(3, -1, 2)
        self.register_buffer("anchors", pixels / stride.view(-1, 1, 1))


class FakeModel(nn.Module):
    def __init__(self, anchors_px: list):
        super().__init__()
        self.model = nn.ModuleList([FakeDetect(anchors_px)])


def pixel_anchors(model: FakeModel) -> torch.Tensor:
    detect = model.model[-1]
    return detect.anchors * detect.stride.view(-1, 1, 1)


def synthetic_dataset(n_images: int = 60, seed: int = 0) -> SimpleNamespace:
    """640x480 images with boxes from three size clusters (small, medium, large) of varied aspect."""
    rng = np.random.default_rng(seed)
    shapes = np.tile([640, 480], (n_images, 1))
    labels = []
    for _ in range(n_images):
        rows = []
        for base in (12, 50, 200):
            for _ in range(3):
                w = base * rng.uniform(0.7, 1.4)
                h = base * rng.uniform(0.7, 1.4)
                rows.append([0, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), w / 640, h / 480])
        labels.append(np.array(rows))
    return SimpleNamespace(shapes=shapes, labels=labels)


def test_ratio_metric_and_bpr_by_hand():
    wh = np.array([[10, 10], [30, 10], [50, 50], [2, 200]], dtype=np.float32)
    anchors = np.array([[10, 10], [40, 40]], dtype=np.float32)
    fit, best = ratio_metric(wh, anchors)
    expected = np.array([[1, 0.25], [1 / 3, 0.25], [0.2, 0.8], [0.05, 0.05]])
    assert np.allclose(fit, expected) and np.allclose(best, expected.max(1))
    bpr, aat = best_possible_recall(wh, anchors, thr=4.0)
    assert bpr == pytest.approx(0.75)  # the 2x200 label fits nothing
    assert aat == pytest.approx(0.75)  # 1 + 1 + 1 + 0 anchors strictly above 1/4, over 4 labels
    assert best_possible_recall(wh, anchors, thr=25.0)[0] == pytest.approx(1.0)


def test_label_wh_scales_to_long_side():
    dataset = SimpleNamespace(shapes=np.array([[1280, 640], [320, 640]]),
                              labels=[np.array([[0, 0.5, 0.5, 0.5, 0.5]]), np.zeros((0, 5))])
    assert np.allclose(label_wh(dataset, 640), [[320, 160]])
    assert np.allclose(label_wh(dataset, 640, scale=np.array([[2.0], [1.0]])), [[640, 320]])
    with pytest.raises(ValueError, match="one array per image"):
        label_wh(SimpleNamespace(shapes=np.array([[10, 10]]), labels=[]), 640)
    with pytest.raises(ValueError, match=r"image 1 have shape \(1, 4\), expected \(n, 5\)"):
        label_wh(SimpleNamespace(shapes=np.ones((2, 2)), labels=[np.zeros((1, 5)), np.zeros((1, 4))]), 640)
    with pytest.raises(ValueError, match=r"no \.shapes and \.labels"):
        label_wh(object(), 640)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + rng.normal(0, 0.3, (50, 2)) for c in centres])
    found, distortion = kmeans(points, 3, np.random.default_rng(1))
    nearest = np.linalg.norm(centres[:, None] - found[None], axis=2).argmin(1)
    assert sorted(nearest) == [0, 1, 2]  # one centroid per cluster
    assert np.allclose(found[nearest], centres, atol=0.2)
    assert distortion < 0.6
    with pytest.raises(ValueError, match="at least k=5"):
        kmeans(points[:4], 5, rng)


def test_good_anchors_are_left_alone(caplog):
    model = FakeModel(YOLOV5_ANCHORS_PX)
    before = model.model[-1].anchors.clone()
    with caplog.at_level(logging.INFO, logger="vitdet"):
        changed = check_anchors(synthetic_dataset(), model, thr=4.0, imgsz=640)
    assert changed is False
    assert torch.equal(model.model[-1].anchors, before)
    assert "anchors/target" in caplog.text and "Best Possible Recall (BPR)" in caplog.text
    assert "good fit" in caplog.text


def test_bad_anchors_are_evolved_in_stride_order(caplog):
    dataset = synthetic_dataset()
    bad = [[2, 2, 2, 3, 3, 2]] * 3  # all tiny: nothing medium or large can be matched
    model = FakeModel(bad)
    wh = label_wh(dataset, 640)
    bpr_before, _ = best_possible_recall(wh, pixel_anchors(model).view(-1, 2).numpy())
    assert bpr_before < 0.5
    with caplog.at_level(logging.INFO, logger="vitdet"):
        changed = check_anchors(dataset, model, thr=4.0, imgsz=640, gen=300)
    assert changed is True and "poor fit" in caplog.text
    pixels = pixel_anchors(model)
    bpr_after, _ = best_possible_recall(wh, pixels.view(-1, 2).numpy())
    assert bpr_after > 0.98
    area = pixels.prod(-1).view(-1)
    assert torch.all(area[1:] >= area[:-1])  # small anchors at stride 8, large at stride 32
    level_mean = pixels.prod(-1).mean(-1)
    assert level_mean[0] < level_mean[1] < level_mean[2]
    assert area[0] < 30**2 and area[-1] > 100**2  # the small and the large cluster both got an anchor


def test_kmean_anchors_is_seeded_and_sorted():
    dataset = synthetic_dataset(n_images=20)
    first = kmean_anchors(dataset, n=9, img_size=640, gen=200, verbose=False, seed=3)
    again = kmean_anchors(dataset, n=9, img_size=640, gen=200, verbose=False, seed=3)
    other = kmean_anchors(dataset, n=9, img_size=640, gen=200, verbose=False, seed=4)
    assert first.shape == (9, 2) and first.dtype == np.float32
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert np.all(np.diff(first.prod(1)) >= 0)
    assert (first >= 2.0).all()
    assert best_possible_recall(label_wh(dataset, 640), first)[0] > 0.98


def test_evolution_improves_fitness_over_kmeans():
    dataset = synthetic_dataset(n_images=20)
    wh = label_wh(dataset, 640)

    def fitness(k):
        _, best = ratio_metric(wh, k)
        return float((best * (best > 0.25)).mean())

    start = kmean_anchors(dataset, n=3, img_size=640, gen=0, verbose=False, seed=0)
    evolved = kmean_anchors(dataset, n=3, img_size=640, gen=300, verbose=False, seed=0)
    assert fitness(evolved) > fitness(start)  # mutation finds what k-means (a distance fit) misses


def test_too_few_labels_fall_back_to_random_start():
    dataset = SimpleNamespace(shapes=np.array([[640, 640]]), labels=[np.array([[0, 0.5, 0.5, 0.1, 0.2]])])
    anchors = kmean_anchors(dataset, n=9, img_size=640, gen=50, verbose=False)
    assert anchors.shape == (9, 2) and np.all(np.diff(anchors.prod(1)) >= 0)


def test_check_anchor_order_flips_reversed_levels():
    model = FakeModel(YOLOV5_ANCHORS_PX[::-1])  # large anchors at stride 8
    detect = model.model[-1]
    assert check_anchor_order(detect) is True
    expected = torch.tensor(YOLOV5_ANCHORS_PX, dtype=torch.float32).view(3, 3, 2)
    assert torch.allclose(pixel_anchors(model), expected)  # each level keeps its pixel sizes
    assert check_anchor_order(detect) is False  # already in order: untouched
    assert torch.allclose(pixel_anchors(model), expected)

    pixel_detect = FakeDetect(YOLOV5_ANCHORS_PX[::-1])
    pixel_detect.anchors = torch.tensor(YOLOV5_ANCHORS_PX[::-1], dtype=torch.float32).view(3, 3, 2)
    assert check_anchor_order(pixel_detect, pixel_units=True) is True
    assert torch.equal(pixel_detect.anchors, expected)


def test_empty_dataset_changes_nothing(caplog):
    model = FakeModel(YOLOV5_ANCHORS_PX)
    dataset = SimpleNamespace(shapes=np.array([[640, 640]]), labels=[np.zeros((0, 5))])
    with caplog.at_level(logging.INFO, logger="vitdet"):
        assert check_anchors(dataset, model) is False
    assert "no labels" in caplog.text


def test_labels_of_one_size_get_that_size():
    # every label 576x24 px: whitening must not divide by a zero spread
    dataset = SimpleNamespace(shapes=np.tile([640, 480], (10, 1)),
                              labels=[np.array([[0, 0.5, 0.5, 0.9, 0.05]] * 3) for _ in range(10)])
    anchors = kmean_anchors(dataset, n=9, img_size=640, gen=50, verbose=False)
    assert np.isfinite(anchors).all()
    assert best_possible_recall(label_wh(dataset, 640), anchors)[0] == 1.0
