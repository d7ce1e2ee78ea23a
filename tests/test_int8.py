"""export.py --int8: static INT8 (QDQ) ONNX calibrated on the train split, gated by the val mAP drop,
run by detect and val like any ONNX file."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from data.builtin import CLASS_NAMES
from data.sources import LoadImages
from data.verify import list_image_files
from engine import quantize
from engine.backend import InferenceBackend, read_onnx_metadata
from engine.checkpoint import checkpoint_dict, save_checkpoint
from engine.exporter import ExportError, compare_outputs, export_and_verify, export_model
from export import main as export_main
from models.yolo import DetectionModel
from tests.test_bf16 import SHALLOW
from tests.test_export import calibrate_batchnorm

IMGSZ = 96
HEAD = "/model.5/"  # node-name prefix of SHALLOW's Detect layer


def make_model() -> DetectionModel:
    """A shallow detector (five convs and Detect; see tests/test_bf16.py) with calibrated BatchNorm: a deep
    random network amplifies every rounding so much that no quantised output could be compared."""
    torch.manual_seed(0)
    model = DetectionModel({**SHALLOW, "nc": len(CLASS_NAMES)})
    model.names = list(CLASS_NAMES)
    calibrate_batchnorm(model, IMGSZ)
    return model


def make_weights(folder: Path) -> Path:
    return save_checkpoint(checkpoint_dict(make_model()), folder / "w.pt")


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, tiny_data):
    weights = make_weights(tmp_path_factory.mktemp("int8"))
    results = export_and_verify(weights, include=("onnx",), imgsz=IMGSZ, int8=True, data=tiny_data, calib=8)
    return weights, results


def test_int8_file_is_quantised_next_to_the_weights_with_its_metadata(int8_export):
    weights, results = int8_export
    path = results["onnx_int8"].path
    assert path == weights.with_name("w_int8.onnx") and path.is_file()
    assert results["onnx"].path == weights.with_name("w.onnx")  # the float export is kept as well
    meta = read_onnx_metadata(path)
    assert meta["stride"] == 32 and meta["names"] == list(CLASS_NAMES) and meta["precision"] == "int8"
    assert meta["exporter"] == "vitdet" and meta["weights"] == "w.pt"
    assert meta["shape"] == [1, 3, IMGSZ, IMGSZ]
    assert meta["int8"]["calibration_images"] == 8 and meta["int8"]["format"] == "QDQ"
    assert read_onnx_metadata(results["onnx"].path)["precision"] == "fp32"
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10  # 5 convs: input, weight
    assert path.stat().st_size < 0.5 * results["onnx"].path.stat().st_size  # int8 weights
    # the Detect head's output convs keep float32 weights (no DequantizeLinear feeding them)
    produced_by = {out: n for n in graph.node for out in n.output}
    head = [n for n in graph.node if n.op_type == "Conv" and n.name.startswith(HEAD)]
    assert len(head) == 3
    for conv in head:
        weight = conv.input[1]
        assert weight not in produced_by or produced_by[weight].op_type != "DequantizeLinear"
    metrics = results["onnx_int8"].metrics
    assert set(metrics) == {"map_float", "map_int8", "drop", "ops", "method"}
    assert metrics["ops"] in ("full", "conv")
    assert metrics["method"] == "qdq"
    assert metrics["drop"] == pytest.approx(metrics["map_float"] - metrics["map_int8"])
    assert not [p for p in weights.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_backend_runs_the_int8_file_close_to_float(int8_export, tiny_data):
    from data.config import check_dataset

    weights, results = int8_export
    backend = InferenceBackend(results["onnx_int8"].path)
    assert (backend.kind, backend.precision, backend.stride, backend.names) == ("onnx", "int8", 32,
                                                                                 list(CLASS_NAMES))
    val, _ = list_image_files(check_dataset(tiny_data)["val"])  # images like the calibration ones
    x, other_x = (torch.from_numpy(quantize.letterboxed(f, IMGSZ, IMGSZ, 32))[None] for f in val[:2])
    pytorch = InferenceBackend(weights)
    reference = pytorch(x)
    _, relative = compare_outputs(reference, backend(x))
    assert 1e-3 < relative < 0.05  # really quantised, and still the same network
    assert compare_outputs(reference, pytorch(other_x))[1] > 5 * relative  # another image moves it further


def test_detect_and_val_run_the_int8_file(int8_export, tiny_data, tmp_path):
    from engine.predictor import run
    from val import main as val_main

    _, results = int8_export
    path = results["onnx_int8"].path
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "x.jpg"), np.full((120, 160, 3), 90, np.uint8))
    save_dir = run(path, folder, imgsz=IMGSZ, device="cpu", conf_thres=0.001, max_det=3, save_txt=True,
                   project=tmp_path, name="detect")
    assert cv2.imread(str(save_dir / "x.jpg")).shape == (120, 160, 3)
    assert len((save_dir / "labels" / "x.txt").read_text().splitlines()) == 3
    status = val_main(["--weights", str(path), "--data", str(tiny_data), "--imgsz", str(IMGSZ),
                       "--workers", "0", "--project", str(tmp_path), "--name", "val"])
    assert status == 0 and (tmp_path / "val" / "metrics.yaml").is_file()


def test_too_strict_tolerance_fails_naming_the_drop(tmp_path, tiny_data, caplog):
    weights = make_weights(tmp_path)
    with caplog.at_level(logging.ERROR, logger="vitdet"):
        status = export_main(["--weights", str(weights), "--include", "onnx", "--int8", "--data",
                              str(tiny_data), "--imgsz", str(IMGSZ), "--calib", "4",
                              "--int8-tolerance", "-1"])
    assert status == 1
    message = " ".join(r.getMessage() for r in caplog.records)
    assert re.search(r"INT8 mAP50-95 \d\.\d{4} vs float \d\.\d{4}: drop -?\d\.\d{4} > --int8-tolerance -1",
                     message), message
    assert not weights.with_name("w_int8.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.onnx", "w.pt"]  # no INT8 file, no temp file


def test_a_dynamic_export_quantises_to_a_dynamic_int8_file_and_the_working_folder_stays_clean(
        tmp_path, monkeypatch):
    # onnxruntime's symbolic shape inference does not complete on this dynamic graph and then saves
    # 'sym_shape_infer_temp.onnx' (+ a data file) into the working folder; the user's folder stays clean
    weights = make_weights(tmp_path)
    float_file = export_and_verify(weights, include=("onnx",), imgsz=IMGSZ, dynamic=True)["onnx"].path
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    batch = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    quantize.quantize_onnx_int8(float_file, tmp_path / "q.onnx", [batch], HEAD, {"precision": "int8"})
    assert list(cwd.iterdir()) == []
    backend = InferenceBackend(tmp_path / "q.onnx")
    assert backend.dynamic and read_onnx_metadata(tmp_path / "q.onnx")["precision"] == "int8"
    for h, w in ((64, 96), (96, 128)):  # rectangular inputs, as detect.py letterboxes video frames
        assert backend(torch.rand(1, 3, h, w)).shape[1] == 3 * ((h // 8) * (w // 8) + (h // 16) * (w // 16)
                                                                 + (h // 32) * (w // 32))


def test_the_gate_validates_quietly_in_a_folder_it_deletes(tmp_path, tiny_data, caplog, monkeypatch):
    # the gate's val runs go to a temporary folder: logging "Results saved to /tmp/..." would point the
    # user at a folder that no longer exists, and nothing may be left behind in the temp dir either
    weights = make_weights(tmp_path)
    monkeypatch.setattr(quantize.tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    with caplog.at_level(logging.INFO, logger="vitdet"):
        value = quantize.val_map(weights, tiny_data, IMGSZ, batch_size=2)
    assert 0.0 <= value <= 1.0
    assert not any("Results saved" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "temp").iterdir()) == []
    caplog.clear()
    from engine.evaluation import EvalOptions, evaluate

    with caplog.at_level(logging.INFO, logger="vitdet"):
        _, save_dir = evaluate(EvalOptions(weights=weights, data=str(tiny_data), imgsz=IMGSZ, batch_size=2,
                                           workers=0, plots=False, project=tmp_path, name="val"))
    assert any(f"Results saved to {save_dir}" in r.getMessage() for r in caplog.records)


def test_accuracy_gate_compares_the_drop_with_the_tolerance():
    assert quantize.check_int8_accuracy(0.5, 0.495, 0.01) == pytest.approx(0.005)
    assert quantize.check_int8_accuracy(0.5, 0.52, 0.0) == pytest.approx(-0.02)  # INT8 better: fine
    with pytest.raises(ValueError, match=r"drop 0\.0500 > --int8-tolerance 0\.01"):
        quantize.check_int8_accuracy(0.5, 0.45, 0.01)


def test_int8_requests_are_checked(tmp_path, tiny_data):
    weights = make_weights(tmp_path)
    with pytest.raises(ValueError, match="add onnx or openvino to --include"):
        export_model(weights, include=("torchscript",), int8=True, data=tiny_data)
    with pytest.raises(ValueError, match="--openvino-int8 qdq converts the INT8 ONNX file; add onnx"):
        export_model(weights, include=("openvino",), int8=True, data=tiny_data, openvino_int8="qdq")
    with pytest.raises(ValueError, match="--int8-preset fast: expected one of mixed, performance"):
        export_model(weights, include=("openvino",), int8=True, data=tiny_data, int8_preset="fast")
    with pytest.raises(ValueError, match="--int8 needs --data"):
        export_model(weights, include=("onnx",), int8=True)
    with pytest.raises(ValueError, match="--calib 0"):
        quantize.calibration_files(tiny_data, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # refused before any work


def test_calibration_images_are_letterboxed_as_detect_feeds_them(tiny_data):
    from data.config import check_dataset

    train, _ = list_image_files(check_dataset(tiny_data)["train"])
    files = quantize.calibration_files(tiny_data, 5)
    assert len(files) == 5 and files[0] == train[0] and files[-1] == train[-1] and len(set(files)) == 5
    assert quantize.calibration_files(tiny_data, 1000) == train
    _, im, _, _, _ = next(iter(LoadImages(files[1], img_size=(IMGSZ, 128), stride=32, auto=False)))
    ours = quantize.letterboxed(files[1], IMGSZ, 128, 32)
    assert ours.shape == (3, IMGSZ, 128) and ours.dtype == np.float32
    assert np.array_equal(ours, im.astype(np.float32) / 255)
    batches = quantize.calibration_batches(files, (2, 3, IMGSZ, 128), 32)
    assert [b.shape for b in batches] == [(2, 3, IMGSZ, 128)] * 3  # 5 images, the last batch filled up


def test_attention_matmuls_and_head_convs_stay_float():
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.0] * 16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="/model.3/linear/MatMul"),
             helper.make_node("MatMul", ["a", "x"], ["b"], name="/model.3/attn/MatMul"),
             helper.make_node("Conv", ["b", "w"], ["c"], name="/model.24/m.0/Conv"),
             helper.make_node("Conv", ["c", "w"], ["d"], name="/model.2/cv1/conv/Conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, [4, 4])], [weight])
    kept = quantize.float_nodes(helper.make_model(graph), "/model.24/")
    assert kept == ["/model.3/attn/MatMul", "/model.24/m.0/Conv"]


def test_benchmarks_detect_fps_runs_the_pt_and_the_dynamic_onnx_int8_and_openvino_exports(tmp_path):
    import benchmarks

    weights = make_weights(tmp_path)
    files = benchmarks.detect_files(weights, HEAD, ("onnx", "int8", "openvino"))
    assert set(files) == {"pt", "onnx", "int8", "int8_fixed", "openvino", "nncf"} and files["pt"] == weights
    for runtime in ("onnx", "int8", "openvino"):  # dynamic: detect.py letterboxes 640x480 frames to 640x480
        assert InferenceBackend(files[runtime]).dynamic, runtime
    assert InferenceBackend(files["int8_fixed"]).fixed_shape == (1, 480, 640)
    for name in ("int8", "int8_fixed"):
        assert read_onnx_metadata(files[name])["precision"] == "int8", name
    assert InferenceBackend(files["nncf"]).precision == "int8"
    fps = benchmarks.detect_fps(make_model().eval(), frames=3, runtimes=("int8", "openvino"))
    assert set(fps) == {"detect_fps", "detect_int8_fps", "detect_int8_fixed_fps", "detect_openvino_fps",
                        "detect_nncf_fps"}
    assert all(v > 0 for v in fps.values())


def _quantised_inputs(graph, op_type: str, inputs: slice = slice(None)) -> int:
    """How many `op_type` nodes take all of `inputs` straight from DequantizeLinear nodes (int8 data)."""
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    return sum(all(produced_by.get(i) == "DequantizeLinear" for i in n.input[inputs])
               for n in graph.node if n.op_type == op_type)


@pytest.mark.parametrize("ops", ["full", "conv"])
def test_int8_ops_choose_what_is_quantised_and_are_recorded_with_the_weight_range(tmp_path, ops, monkeypatch):
    from engine import precision

    weights = make_weights(tmp_path)
    float_file = export_and_verify(weights, include=("onnx",), imgsz=IMGSZ)["onnx"].path
    batch = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    for vnni in (True, False):
        monkeypatch.setattr(precision, "cpu_has_vnni", lambda vnni=vnni: vnni)
        out = tmp_path / f"{ops}_{vnni}.onnx"
        quantize.quantize_onnx_int8(float_file, out, [batch], HEAD, ops=ops)
        settings = read_onnx_metadata(out)["int8"]
        assert settings["ops"] == ops and settings["reduce_range"] is (not vnni)  # 7-bit weights without VNNI
    graph = onnx.load(str(out)).graph
    # SiLU = x * sigmoid(x) after every conv: 'full' multiplies quantised x and quantised sigmoid(x)
    # (integer kernels); 'conv' quantises conv outputs only, so sigmoid(x) reaches the Mul in float
    silu_muls = _quantised_inputs(graph, "Mul")
    assert silu_muls == (5 if ops == "full" else 0)
    assert _quantised_inputs(graph, "Conv", slice(1, 2)) == 5  # int8 weights: the 5 backbone convs, not the
    # head's 3
    head = [n for n in graph.node if n.name.startswith(HEAD)]
    produced_by = {o: n.op_type for n in graph.node for o in n.output}
    assert head and all(produced_by.get(i) != "DequantizeLinear" for n in head if n.op_type != "Conv"
                        for i in n.input[1:])  # box decoding: grid and anchor constants stay float


def test_full_range_int8_file_warns_on_a_cpu_without_vnni(int8_export, monkeypatch, caplog):
    from engine import precision

    _, results = int8_export
    path = results["onnx_int8"].path
    full_range = read_onnx_metadata(path)["int8"]["reduce_range"] is False
    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: False)
    with caplog.at_level(logging.WARNING, logger="vitdet"):
        InferenceBackend(path)
    warned = any("full 8-bit range" in r.getMessage() for r in caplog.records)
    assert warned == full_range
    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitdet"):
        InferenceBackend(path)
    assert not any("full 8-bit range" in r.getMessage() for r in caplog.records)


def test_auto_ops_fall_back_to_conv_when_full_fails_the_gate(tmp_path, tiny_data, monkeypatch, caplog):
    real_val_map = quantize.val_map

    def val_map(path, *args, **kwargs):  # a 'full' model that loses 0.5 mAP50-95
        value = real_val_map(path, *args, **kwargs)
        settings = read_onnx_metadata(path).get("int8") or {}
        return value - 0.5 if settings.get("ops") == "full" else value

    monkeypatch.setattr(quantize, "val_map", val_map)
    weights = make_weights(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vitdet"):
        results = export_and_verify(weights, include=("onnx",), imgsz=IMGSZ, int8=True, data=tiny_data,
                                    calib=4, int8_tolerance=0.1)
    assert results["onnx_int8"].metrics["ops"] == "conv"
    assert read_onnx_metadata(results["onnx_int8"].path)["int8"]["ops"] == "conv"
    assert any("ops 'full' failed the accuracy gate" in r.getMessage() for r in caplog.records)
    with pytest.raises(ExportError,
                       match=r"ops 'full': INT8 mAP50-95 .* drop 0\.5\d+ > --int8-tolerance 0\.1"):
        export_and_verify(weights, include=("onnx",), imgsz=IMGSZ, int8=True, data=tiny_data, calib=4,
                          int8_tolerance=0.1, int8_ops="full")
    with pytest.raises(ValueError, match="--int8-ops fast: expected one of auto, full, conv"):
        export_and_verify(weights, include=("onnx",), imgsz=IMGSZ, int8=True, data=tiny_data, int8_ops="fast")


@pytest.mark.slow
def test_benchmark_precision_maps_measure_every_precision_of_one_checkpoint(tmp_path, tiny_data, monkeypatch):
    import benchmarks
    from engine import precision

    calls = []  # every val run, really run: (what it validated, under bf16 or not)
    real_val_map = quantize.val_map

    def val_map(path, *args, bf16=False, **kwargs):
        calls.append(("folder" if Path(path).is_dir() else Path(path).suffix, bf16))
        return real_val_map(path, *args, bf16=bf16, **kwargs)

    monkeypatch.setattr(quantize, "val_map", val_map)
    native = precision.cpu_bf16_support().native
    maps = dict(benchmarks.precision_maps(str(make_weights(tmp_path)), str(tiny_data), IMGSZ))
    labels = ["eager fp32", "eager bf16" + ("" if native else " (emulated)"), "ONNX Runtime fp32"]
    assert list(maps)[:3] == labels and list(maps)[3].startswith("ONNX Runtime INT8 (ops '")
    openvino = ["OpenVINO fp32", "OpenVINO INT8 (nncf mixed)"] + (["OpenVINO bf16"] if native else [])
    assert list(maps)[4:] == openvino
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in maps.values()), maps
    # the INT8 gate validates the float and INT8 ONNX files; then eager bf16, eager fp32, and the NNCF gate
    # the float and INT8 OpenVINO folders
    assert calls[-5 if native else -4:] == [(".pt", True), (".pt", False), ("folder", False),
                                            ("folder", False)] + ([("folder", True)] if native else [])
    # the same float model through three runtimes: the same detections up to float rounding
    assert maps["ONNX Runtime fp32"] == pytest.approx(maps["eager fp32"], abs=0.01)
    assert maps["OpenVINO fp32"] == pytest.approx(maps["eager fp32"], abs=0.01)
    assert list(tmp_path.iterdir()) == [tmp_path / "w.pt"]  # exports went to a temporary folder
