"""Plots and drawing write real, readable files of the expected names and sizes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, ap_per_class
from utils.plots import Annotator, colors, plot_images, plot_labels, plot_results, save_one_box


def _read(path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000, path
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    return image


def test_colors_palette():
    assert colors(0) == (255, 56, 56)
    assert colors(0, bgr=True) == (56, 56, 255)
    assert colors(20) == colors(0) and colors(3) != colors(4)


def test_annotator_draws_box_and_label():
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    annotator = Annotator(image, line_width=2)
    annotator.box_label([20, 40, 80, 90], "persön 0.9", color=(0, 200, 0))  # non-ASCII drawn as '?'
    result = annotator.result()
    assert result.shape == (100, 120, 3)
    assert tuple(result[60, 20]) == (0, 200, 0)  # left edge of the box
    assert tuple(result[60, 50]) == (0, 0, 0)  # inside stays untouched
    assert (result[25:40, 20:60] != 0).any()  # label tab above the box
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        Annotator(np.zeros((10, 10)))


def test_plot_images_labels_and_predictions(tmp_path):
    images = torch.rand(4, 3, 64, 96)  # [0, 1] floats as in validation
    labels = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [3, 0, 0.2, 0.3, 0.2, 0.2]])  # normalised xywh
    predictions = torch.tensor([[1, 2, 40.0, 30.0, 20.0, 10.0, 0.9], [2, 1, 10.0, 10.0, 8.0, 8.0, 0.1]])
    f1 = plot_images(images, labels, paths=["a/img1.jpg"] * 4, fname=tmp_path / "val_batch0_labels.jpg",
                     names=["cat", "dog", "bird"])  # fmt: skip
    f2 = plot_images((images * 255).to(torch.uint8), predictions, fname=tmp_path / "val_batch0_pred.jpg")
    assert _read(f1).shape == (128, 192, 3)  # 2 x 2 grid of 64 x 96 tiles
    assert _read(f2).shape == (128, 192, 3)
    assert plot_images(images, torch.zeros(0, 6), fname=tmp_path / "train_batch0.jpg").is_file()
    with pytest.raises(ValueError, match=r"\(M, 6\) or \(M, 7\)"):
        plot_images(images, torch.zeros(2, 5), fname=tmp_path / "bad.jpg")


def test_plot_images_downscales_big_batches(tmp_path):
    images = np.zeros((16, 3, 640, 640), dtype=np.uint8)
    pixel_targets = np.array([[15, 0, 320.0, 320.0, 100.0, 100.0]])
    mosaic = _read(plot_images(images, pixel_targets, fname=tmp_path / "m.jpg"))
    assert mosaic.shape == (1920, 1920, 3)


def test_plot_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.concatenate((rng.integers(0, 3, (200, 1)), rng.uniform(0.1, 0.9, (200, 4)) * 0.5), 1)
    assert _read(plot_labels(labels, ["a", "b", "c"], tmp_path)).shape[2] == 3
    assert (tmp_path / "labels.jpg").is_file()


def test_plot_results(tmp_path):
    header = ["               epoch", "      train/box_loss", "   metrics/precision", "metrics/mAP_0.5:0.95",
              "               x/lr0"]  # fmt: skip
    rows = [[e, 0.1 / (e + 1), 0.1 * e, 0.05 * e, 0.01] for e in range(6)]
    csv_file = tmp_path / "results.csv"
    csv_file.write_text("\n".join([",".join(header)] + [",".join(f"{v:g}" for v in r) for r in rows]) + "\n")
    out = plot_results(csv_file)
    assert out == tmp_path / "results.png" and out.stat().st_size > 1000
    assert plot_results(tmp_path) == out  # a folder of results*.csv works too
    csv_file.write_text(",".join(header) + "\n")
    with pytest.raises(ValueError, match="no data rows"):
        plot_results(csv_file)
    with pytest.raises(FileNotFoundError):
        plot_results(tmp_path / "nope.csv")


def test_save_one_box(tmp_path):
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[..., 0] = 255  # blue in BGR
    crop = save_one_box([10, 20, 50, 40], image, file=tmp_path / "crops" / "im.jpg", gain=1.0, pad=0)
    assert crop.shape == (20, 40, 3)
    assert crop[0, 0].tolist() == [0, 0, 255]  # returned as RGB by default
    save_one_box([10, 20, 50, 40], image, file=tmp_path / "crops" / "im.jpg", gain=1.0, pad=0)
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == ["im.jpg", "im2.jpg"]  # no overwrite
    assert cv2.imread(str(tmp_path / "crops" / "im.jpg"))[5, 5, 0] > 200  # saved colours are right
    square = save_one_box([10, 20, 50, 40], image, gain=1.0, pad=10, square=True, BGR=True, save=False)
    assert square.shape == (50, 50, 3) and square[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(ValueError, match="outside"):
        save_one_box([300, 300, 400, 400], image, save=False, pad=0)


def test_metric_curves_and_confusion_matrix(tmp_path):
    rng = np.random.default_rng(0)
    tp = rng.random((60, 10)) < 0.6
    conf, pred_cls, target_cls = rng.random(60), rng.integers(0, 3, 60), rng.integers(0, 3, 40)
    ap_per_class(tp, conf, pred_cls, target_cls, plot=True, save_dir=tmp_path, names={0: "a", 1: "b", 2: "c"})
    for name in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"):
        _read(tmp_path / name)
    cm = ConfusionMatrix(nc=3)
    labels = torch.tensor([[1.0, 0, 0, 10, 10], [2, 50, 50, 60, 60]])
    cm.process_batch(torch.tensor([[0.0, 0, 10, 10, 0.9, 1]]), labels)
    assert cm.plot(save_dir=tmp_path, names=["a", "b", "c"]) == tmp_path / "confusion_matrix.png"
    _read(tmp_path / "confusion_matrix.png")
