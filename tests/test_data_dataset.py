"""LoadImagesAndLabels: geometry of mosaic/flips/letterbox samples, the shapes contract, rect, caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.dataset import LoadImagesAndLabels
from tests.data_fixtures import (
    assert_boxes_on_pixels,
    draw_boxes,
    no_augment_hyp,
    rect_dataset,
    sample_to_bgr_and_boxes,
    write_sample,
    yolo_rows,
)
from utils.boxes import xywhn2xyxy


@pytest.fixture()
def images(tmp_path):
    return rect_dataset(tmp_path, n_images=4, size=(160, 120))


def _check_sample(item, tol=2.0) -> int:
    img, labels_out, _, _ = item
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    assert labels_out.dtype == torch.float32 and labels_out.shape[1] == 6
    bgr, boxes = sample_to_bgr_and_boxes(img, labels_out)
    assert_boxes_on_pixels(bgr, boxes, tol=tol)
    return len(boxes)


def test_mosaic_with_perspective_and_flips_keeps_boxes_on_pixels(images):
    hyp = no_augment_hyp(mosaic=1.0, degrees=10, translate=0.1, scale=0.5, shear=2, fliplr=0.5, flipud=0.5)
    dataset = LoadImagesAndLabels(images, img_size=160, augment=True, hyp=hyp, seed=1)
    n_boxes = [_check_sample(dataset[i % 4]) for i in range(12)]
    assert all(dataset[0][0].shape == (3, 160, 160) for _ in range(2))
    assert sum(n_boxes) >= 12  # most mosaics keep several boxes
    assert dataset[0][3] is None  # mosaic samples have no rescaling info


def test_plain_mosaic_tiles_four_images_around_the_centre(images):
    dataset = LoadImagesAndLabels(images, img_size=160, augment=True, hyp=no_augment_hyp(mosaic=1.0), seed=0)
    for _ in range(4):
        crop, labels = dataset.load_mosaic(0)
        # without warp parameters the 2s x 2s mosaic is cropped to its central s x s by the -s/2 border
        assert crop.shape == (160, 160, 3)
        assert_boxes_on_pixels(crop, labels, tol=1.0)


def test_flips_mirror_boxes_with_the_image(images):
    hyp = no_augment_hyp(fliplr=1.0, flipud=1.0)
    dataset = LoadImagesAndLabels(images, img_size=160, augment=True, hyp=hyp)
    plain = LoadImagesAndLabels(images, img_size=160, augment=False)
    flipped, original = dataset[1], plain[1]
    assert torch.equal(flipped[0], original[0].flip(1).flip(2))
    expected = original[1].clone()
    expected[:, 2:4] = 1 - expected[:, 2:4]
    torch.testing.assert_close(flipped[1], expected, atol=1e-5, rtol=0)
    _check_sample(flipped)


def test_letterboxed_sample_and_shapes_map_boxes_back_to_the_original(tmp_path):
    boxes, classes = [(10, 20, 60, 70), (100, 5, 190, 40)], [0, 1]
    img = draw_boxes(200, 80, boxes, classes)
    write_sample(tmp_path, "val", "wide.png", img, yolo_rows(boxes, classes, 200, 80))
    dataset = LoadImagesAndLabels(tmp_path / "images" / "val", img_size=128, augment=False)
    img, labels_out, path, shapes = dataset[0]
    assert img.shape == (3, 128, 128) and path.endswith("wide.png")
    (h0, w0), ((gain_h, gain_w), (pad_w, pad_h)) = shapes
    assert (h0, w0) == (80, 200) and gain_w == pytest.approx(128 / 200) and pad_w == 0 and pad_h > 0
    _check_sample(dataset[0], tol=1.5)
    # back to the original image, each axis with its own gain (load_image rounds both sides up, so
    # the gains differ slightly: 52/80 vs 128/200 here)
    pixels = xywhn2xyxy(labels_out[:, 2:].numpy().astype(float), 128, 128)
    back = (pixels - [pad_w, pad_h, pad_w, pad_h]) / [gain_w, gain_h, gain_w, gain_h]
    np.testing.assert_allclose(back, boxes, atol=0.5)
    assert gain_h == pytest.approx(52 / 80)


def test_rect_batches_group_by_aspect_ratio_with_stride_multiple_shapes(tmp_path):
    sizes = [(64, 64), (128, 64), (64, 128), (120, 60), (60, 120), (96, 64)]
    for k, (w, h) in enumerate(sizes):
        write_sample(tmp_path, "val", f"{k}.png", draw_boxes(w, h, [(4, 4, 20, 20)], [0]),
                     yolo_rows([(4, 4, 20, 20)], [0], w, h))  # fmt: skip
    dataset = LoadImagesAndLabels(tmp_path / "images" / "val", 128, batch_size=2, rect=True, stride=32)
    aspect = dataset.shapes[:, 1] / dataset.shapes[:, 0]
    assert (np.diff(aspect) >= 0).all()  # sorted by h / w
    # h/w per batch: (0.5, 0.5) -> wide, (0.67, 1.0) -> square (spans 1), (2, 2) -> tall
    assert dataset.batch_shapes.tolist() == [[64, 128], [128, 128], [128, 64]]
    for k in range(len(dataset)):
        img, _, _, _ = dataset[k]
        assert tuple(img.shape[1:]) == tuple(dataset.batch_shapes[dataset.batch[k]])
        _check_sample(dataset[k], tol=1.5)
    batch = LoadImagesAndLabels.collate_fn([dataset[2], dataset[3]])
    assert batch[0].shape == (2, 3, 128, 128)


def test_collate_fn_numbers_targets_by_image(images):
    dataset = LoadImagesAndLabels(images, img_size=160)
    imgs, targets, paths, shapes = LoadImagesAndLabels.collate_fn([dataset[0], dataset[1], dataset[2]])
    assert imgs.shape == (3, 3, 160, 160) and imgs.dtype == torch.uint8
    assert targets[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(paths) == 3 and len(shapes) == 3


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_image_caches_give_the_same_samples(images, mode):
    plain = LoadImagesAndLabels(images, img_size=96)
    cached = LoadImagesAndLabels(images, img_size=96, cache_images=mode)
    if mode == "ram":
        assert all(im is not None for im in cached.ims)
    else:
        assert all(p.endswith(".npy") for p in cached.npy_files) and len(list(images.glob("*.npy"))) == 4
    for k in range(len(plain)):
        assert torch.equal(plain[k][0], cached[k][0]) and torch.equal(plain[k][1], cached[k][1])
    again = LoadImagesAndLabels(images, img_size=96)  # the .npy files are not taken for images
    assert len(again) == 4


def test_single_cls_and_polygons_reach_the_samples(tmp_path):
    write_sample(tmp_path, "train", "p.png", draw_boxes(64, 64, [(8, 8, 40, 40)], [2]),
                 "2 0.125 0.125 0.625 0.125 0.125 0.625\n1 0.8 0.8 0.1 0.1\n")  # fmt: skip
    dataset = LoadImagesAndLabels(tmp_path / "images" / "train", img_size=64, single_cls=True)
    assert dataset.labels[0][:, 0].tolist() == [0, 0]
    assert len(dataset.segments[0]) == 2
    hyp = no_augment_hyp(mosaic=1.0, copy_paste=1.0)
    mosaic = LoadImagesAndLabels(tmp_path / "images" / "train", img_size=64, augment=True, hyp=hyp, seed=0)
    canvas, labels = mosaic.load_mosaic(0)
    assert canvas.shape == (64, 64, 3) and labels.shape[1] == 5


def test_bad_arguments_are_rejected(images):
    with pytest.raises(ValueError, match="cache_images"):
        LoadImagesAndLabels(images, cache_images="gpu")
    with pytest.raises(KeyError, match="mosaic"):
        LoadImagesAndLabels(images, augment=True, hyp={"hsv_h": 0.0})
