"""Static rectangular exports (export.py --imgsz H W): exported, verified, INT8-gated with every val image
letterboxed to exactly H x W, and run by detect.py and val.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engine.backend import InferenceBackend, read_onnx_metadata
from engine.evaluation import EvalOptions, evaluate
from engine.exporter import export_and_verify
from tests.test_int8 import make_weights

HEIGHT, WIDTH = 96, 128


@pytest.fixture(scope="module")
def rect_int8(tmp_path_factory, tiny_data):
    weights = make_weights(tmp_path_factory.mktemp("rect"))
    results = export_and_verify(weights, include=("onnx", "openvino"), imgsz=(HEIGHT, WIDTH), int8=True,
                                data=tiny_data, calib=4)
    return weights, results


def test_static_rectangular_int8_export_is_written_with_its_shape(rect_int8):
    _, results = rect_int8
    for fmt in ("onnx", "onnx_int8", "openvino", "openvino_int8"):
        backend = InferenceBackend(results[fmt].path)
        assert backend.fixed_shape == (1, HEIGHT, WIDTH), fmt
        assert backend.precision == ("int8" if fmt.endswith("int8") else "fp32"), fmt
    assert read_onnx_metadata(results["onnx_int8"].path)["shape"] == [1, 3, HEIGHT, WIDTH]
    for fmt in ("onnx_int8", "openvino_int8"):
        metrics = results[fmt].metrics
        assert 0.0 <= metrics["map_int8"] <= 1.0 and metrics["drop"] <= 0.01, fmt
    assert results["openvino_int8"].metrics["method"] == "nncf"


def test_val_letterboxes_every_image_to_the_static_rectangle(rect_int8, tiny_data, tmp_path, monkeypatch):
    _, results = rect_int8
    backend = InferenceBackend(results["onnx_int8"].path)
    shapes = []
    real_call = InferenceBackend.__call__

    def spy(self, im, augment=False):
        shapes.append(tuple(im.shape[2:]))
        return real_call(self, im, augment)

    monkeypatch.setattr(InferenceBackend, "__call__", spy)
    val, _ = evaluate(EvalOptions(weights=backend.weights, data=str(tiny_data), imgsz=640, batch_size=4,
                                  workers=0, plots=False, project=tmp_path, name="val"))
    assert shapes and set(shapes) == {(HEIGHT, WIDTH)}  # 640 asked; the export's shape used
    assert val.map == pytest.approx(results["onnx_int8"].metrics["map_int8"], abs=1e-6)  # the gate's mAP


@pytest.mark.parametrize("fmt", ["onnx_int8", "openvino_int8"])
def test_detect_and_val_scripts_run_the_static_rectangular_int8_file(rect_int8, tiny_data, tmp_path, fmt):
    from engine.predictor import run
    from val import main as val_main

    _, results = rect_int8
    path = results[fmt].path
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "frame.jpg"), np.full((480, 640, 3), 90, np.uint8))  # a 640x480 camera frame
    cv2.imwrite(str(folder / "tall.jpg"), np.full((200, 100, 3), 90, np.uint8))
    save_dir = run(path, folder, imgsz=(HEIGHT, WIDTH), device="cpu", conf_thres=0.001, max_det=3,
                   save_txt=True, project=tmp_path, name="detect")
    assert cv2.imread(str(save_dir / "frame.jpg")).shape == (480, 640, 3)
    for stem in ("frame", "tall"):
        rows = np.loadtxt(save_dir / "labels" / f"{stem}.txt", ndmin=2)
        assert rows.shape == (3, 5) and (rows[:, 1:] >= 0).all() and (rows[:, 1:] <= 1).all()
    status = val_main(["--weights", str(path), "--data", str(tiny_data), "--imgsz", "640", "--workers", "0",
                       "--project", str(tmp_path), "--name", "val"])
    assert status == 0 and (tmp_path / "val" / "metrics.yaml").is_file()


def test_a_static_rectangular_export_refuses_another_shape(rect_int8):
    _, results = rect_int8
    backend = InferenceBackend(results["onnx"].path)
    with pytest.raises(ValueError, match=f"exported for {HEIGHT}x{WIDTH} input, got {WIDTH}x{HEIGHT}"):
        backend(torch.zeros(1, 3, WIDTH, HEIGHT))
