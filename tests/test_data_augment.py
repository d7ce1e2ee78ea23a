"""Augmentation functions: shapes and numbers, and boxes that stay on the drawn pixels."""

from __future__ import annotations

import numpy as np
import pytest

from data.augment import augment_hsv, box_candidates, copy_paste, letterbox, mixup, random_perspective
from tests.data_fixtures import BACKGROUND, PALETTE, assert_boxes_on_pixels, draw_boxes

BOXES = [(10, 12, 50, 40), (70, 30, 110, 90), (120, 5, 150, 60), (30, 60, 60, 110)]
CLASSES = [0, 1, 2, 3]


def _scene(width: int = 160, height: int = 120) -> tuple[np.ndarray, np.ndarray]:
    img = draw_boxes(width, height, BOXES, CLASSES)
    labels = np.array([[c, *b] for c, b in zip(CLASSES, BOXES)], dtype=np.float32)
    return img, labels


def test_letterbox_fixed_shape_pads_evenly_with_grey():
    img = np.zeros((100, 200, 3), np.uint8)
    out, ratio, (pad_w, pad_h) = letterbox(img, 256, auto=False)
    assert out.shape == (256, 256, 3)
    assert ratio == (1.28, 1.28) and (pad_w, pad_h) == (0.0, 64.0)
    assert (out[:64] == 114).all() and (out[-64:] == 114).all() and (out[64:-64] == 0).all()


def test_letterbox_auto_pads_to_stride_multiple_and_scaleup_false_keeps_size():
    img = np.zeros((100, 200, 3), np.uint8)
    out, _, (pad_w, pad_h) = letterbox(img, 256, auto=True, stride=32)
    assert out.shape == (128, 256, 3) and (pad_w, pad_h) == (0.0, 0.0)
    out, ratio, (pad_w, pad_h) = letterbox(img, 256, auto=False, scaleup=False)
    assert ratio == (1.0, 1.0) and out.shape == (256, 256, 3) and (pad_w, pad_h) == (28.0, 78.0)
    out, ratio, _ = letterbox(img, (64, 96), auto=False, scaleFill=True)
    assert out.shape == (64, 96, 3) and ratio == (96 / 200, 64 / 100)


def test_letterbox_keeps_boxes_on_pixels():
    img, labels = _scene()
    out, (rw, rh), (pad_w, pad_h) = letterbox(img, 256, auto=False)
    moved = labels.copy()
    moved[:, [1, 3]] = labels[:, [1, 3]] * rw + pad_w
    moved[:, [2, 4]] = labels[:, [2, 4]] * rh + pad_h
    assert_boxes_on_pixels(out, moved, tol=1.5)


@pytest.mark.parametrize("seed", range(6))
def test_random_perspective_keeps_boxes_on_pixels(seed):
    img, labels = _scene()
    rng = np.random.default_rng(seed)
    out, warped = random_perspective(
        img, labels, degrees=30, translate=0.1, scale=0.3, shear=5, perspective=0.0005, rng=rng
    )
    assert out.shape == img.shape
    assert len(warped) >= 1
    assert_boxes_on_pixels(out, warped, tol=2.0)


def test_random_perspective_border_crops_to_smaller_canvas():
    img, labels = _scene(320, 240)
    out, warped = random_perspective(
        img, labels, degrees=0, translate=0, scale=0, shear=0, border=(-60, -80), rng=np.random.default_rng(0)
    )
    assert out.shape == (120, 160, 3)
    # a pure centre crop: the box inside the crop window moves by the border
    assert_boxes_on_pixels(out, warped, tol=1.0)


def test_random_perspective_identity_changes_nothing():
    img, labels = _scene()
    out, same = random_perspective(img, labels, degrees=0, translate=0, scale=0, shear=0, perspective=0)
    assert (out == img).all()
    np.testing.assert_allclose(same, labels)


def test_box_candidates_filter():
    before = np.array([[0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 100, 100]], float).T
    after = np.array([[0, 0, 50, 50], [0, 0, 2, 50], [0, 0, 20, 20], [0, 0, 99, 0.5]], float).T
    # kept / too thin (2 px) / under 10 % of the area / thin and extreme aspect ratio
    assert box_candidates(before, after).tolist() == [True, False, False, False]
    assert box_candidates(before, after, area_thr=0.01).tolist() == [True, False, True, False]


def test_augment_hsv_zero_gain_is_identity_and_seeded_changes_are_reproducible():
    img, _ = _scene()
    same = img.copy()
    augment_hsv(same, 0, 0, 0)
    assert (same == img).all()
    a, b = img.copy(), img.copy()
    augment_hsv(a, 0.5, 0.5, 0.5, rng=np.random.default_rng(3))
    augment_hsv(b, 0.5, 0.5, 0.5, rng=np.random.default_rng(3))
    assert (a == b).all() and not (a == img).all() and a.dtype == np.uint8


def test_mixup_blends_pixels_and_keeps_both_label_sets():
    a, b = np.full((8, 8, 3), 200, np.uint8), np.full((8, 8, 3), 100, np.uint8)
    la, lb = np.array([[0, 1, 1, 3, 3]], np.float32), np.array([[1, 2, 2, 6, 6]], np.float32)
    out, labels = mixup(a, la, b, lb, rng=np.random.default_rng(0))
    ratio = np.random.default_rng(0).beta(32.0, 32.0)
    assert (out == int(200 * ratio + 100 * (1 - ratio))).all()
    assert labels.tolist() == [*la.tolist(), *lb.tolist()]


def test_copy_paste_boxes_pastes_mirrored_objects_where_free():
    width = 160
    img = draw_boxes(width, 100, [(10, 10, 40, 50)], [4])
    labels = np.array([[4, 10, 10, 40, 50]], np.float32)
    out, new_labels, segments = copy_paste(img.copy(), labels, [], p=1.0, rng=np.random.default_rng(0))
    assert new_labels.tolist() == [[4, 10, 10, 40, 50], [4, width - 40, 10, width - 10, 50]]
    assert segments == []  # box-only labels stay box-only
    assert (out[10:50, width - 40 : width - 10] == PALETTE[4]).all()
    assert (out[60:, :] == BACKGROUND).all()


def test_copy_paste_skips_copies_that_would_cover_an_object():
    width = 100
    img = draw_boxes(width, 60, [(10, 10, 40, 50), (60, 10, 90, 50)], [0, 1])  # mirror images of each other
    labels = np.array([[0, 10, 10, 40, 50], [1, 60, 10, 90, 50]], np.float32)
    out, new_labels, _ = copy_paste(img.copy(), labels, [], p=1.0, rng=np.random.default_rng(0))
    assert len(new_labels) == 2 and (out == img).all()


def test_copy_paste_with_polygons_pastes_only_the_polygon():
    width = 120
    img = draw_boxes(width, 80, [(10, 10, 50, 50)], [2])
    labels = np.array([[2, 10, 10, 50, 50]], np.float32)
    triangle = np.array([[10, 10], [49, 10], [10, 49]], np.float32)
    rng = np.random.default_rng(0)
    out, new_labels, segments = copy_paste(img.copy(), labels, [triangle], p=1.0, rng=rng)
    assert len(new_labels) == 2 and len(segments) == 2
    np.testing.assert_allclose(segments[1], np.stack([width - triangle[:, 0], triangle[:, 1]], 1))
    assert (out[12, width - 15] == PALETTE[2]).all()  # inside the mirrored triangle
    assert (out[45, width - 45] == BACKGROUND).all()  # inside the mirrored box, outside the triangle
