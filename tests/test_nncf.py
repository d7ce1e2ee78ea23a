"""export.py --include openvino --int8: NNCF post-training quantisation of the float IR, the Detect head's
output convs and decoding kept in float, gated by the val mAP50-95 drop like the ONNX Runtime INT8 file."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import yaml

from data.builtin import CLASS_NAMES
from engine.backend import InferenceBackend
from engine.exporter import compare_outputs, export_and_verify
from engine.quantize_openvino import float_head_nodes, has_attention
from export import main as export_main
from tests.test_int8 import HEAD, IMGSZ, make_weights

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")


def _ops(xml):
    return ov.Core().read_model(str(xml)).get_ordered_ops()


@pytest.fixture(scope="module")
def nncf_export(tmp_path_factory, tiny_data):
    weights = make_weights(tmp_path_factory.mktemp("nncf"))
    results = export_and_verify(weights, include=("openvino",), imgsz=IMGSZ, int8=True, data=tiny_data,
                                calib=8)
    return weights, results


def test_nncf_ir_is_written_with_its_settings_and_int8_ops(nncf_export):
    weights, results = nncf_export
    assert set(results) == {"openvino", "openvino_int8"}  # openvino alone: no ONNX file needed
    folder = results["openvino_int8"].path
    assert folder == weights.with_name("w_int8_openvino_model")
    assert {p.name for p in folder.iterdir()} == {"w_int8.xml", "w_int8.bin", "metadata.yaml"}
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert meta["precision"] == "int8" and meta["names"] == list(CLASS_NAMES) and meta["weights"] == "w.pt"
    assert meta["exporter"] == "vitdet" and meta["imgsz"] == [IMGSZ, IMGSZ] and meta["stride"] == 32
    settings = meta["int8"]
    assert settings["method"] == "nncf" and settings["preset"] == "mixed"
    assert settings["model_type"] == "default"
    assert settings["calibration_images"] == 8 and settings["head_nodes_in_float"] > 10
    metrics = results["openvino_int8"].metrics
    assert metrics["method"] == "nncf"
    assert metrics["drop"] == pytest.approx(metrics["map_float"] - metrics["map_int8"])
    fake_quantize = [op for op in _ops(folder / "w_int8.xml") if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantize) >= 5
    assert not any(op.get_type_name() == "FakeQuantize" for op in _ops(results["openvino"].path / "w.xml"))


def test_the_head_stays_float_and_the_body_convs_are_quantised(nncf_export):
    _, results = nncf_export
    ops = _ops(results["openvino_int8"].path / "w_int8.xml")
    quantised_inputs = {}
    for op in ops:
        sources = [op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())]
        quantised_inputs[op.get_friendly_name()] = "FakeQuantize" in sources
    head = [op for op in ops if op.get_friendly_name().startswith(HEAD)]
    head_convs = [op.get_friendly_name() for op in head if op.get_type_name() == "Convolution"]
    decoding = [op.get_friendly_name() for op in head
                if op.get_type_name() not in ("Convolution", "Constant")]
    body_convs = [op.get_friendly_name() for op in ops
                  if op.get_type_name() == "Convolution" and not op.get_friendly_name().startswith(HEAD)]
    # neither their inputs nor their weights pass through a FakeQuantize
    assert len(head_convs) == 3 and not any(quantised_inputs[name] for name in head_convs)
    assert decoding and not any(quantised_inputs[name] for name in decoding)
    assert body_convs and all(quantised_inputs[name] for name in body_convs)


def test_backend_runs_the_nncf_ir_quantised_and_close_to_float(nncf_export):
    weights, results = nncf_export
    backend = InferenceBackend(results["openvino_int8"].path)
    assert (backend.kind, backend.precision, backend.stride) == ("openvino", "int8", 32)
    x = torch.rand((1, 3, IMGSZ, IMGSZ), generator=torch.Generator().manual_seed(1))
    _, relative = compare_outputs(InferenceBackend(weights)(x), backend(x))
    assert 1e-4 < relative < 0.1, relative  # rounded by int8, still the same network


def test_too_strict_tolerance_fails_the_nncf_export_with_the_drop_and_leaves_no_folder(tmp_path, tiny_data,
                                                                                         caplog):
    weights = make_weights(tmp_path)
    with caplog.at_level(logging.INFO, logger="vitdet"):
        status = export_main(["--weights", str(weights), "--include", "openvino", "--int8", "--data",
                              str(tiny_data), "--imgsz", str(IMGSZ), "--calib", "4",
                              "--int8-tolerance", "-1"])
    assert status == 1
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "openvino_int8: NNCF post-training quantisation of the float IR (--openvino-int8 nncf, the " \
           "default" in message  # what it chose, said
    assert re.search(r"openvino_int8 export of w_int8_openvino_model failed: INT8 mAP50-95 \d\.\d{4} vs "
                     r"float \d\.\d{4}: drop -?\d\.\d{4} > --int8-tolerance -1", message), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt", "w_openvino_model"]


def test_accuracy_control_returns_layers_to_float_until_the_metric_is_within_max_drop(nncf_export, tiny_data,
                                                                                     tmp_path):
    """NNCF's accuracy control driven by our validate(compiled model) -> metric, each candidate run through
    our OpenVINO runner: fewer FakeQuantize nodes than the fully quantised IR, metric within max_drop."""
    from engine import quantize
    from engine.formats.openvino import OpenVINORunner
    from engine.quantize_openvino import AccuracyRestore, fake_quantize_count, quantize_openvino_ir

    _, results = nncf_export
    float_ir = results["openvino"].path
    cpu = torch.device("cpu")
    x = torch.rand((1, 3, IMGSZ, IMGSZ), generator=torch.Generator().manual_seed(2))
    reference = InferenceBackend(float_ir)(x)

    def backend_of(compiled):
        return InferenceBackend.from_runner(float_ir, OpenVINORunner(float_ir, cpu, compiled=compiled), cpu)

    def metric(compiled) -> float:  # 1 minus the output distance from the float IR: 1 for the float model
        return 1.0 - compare_outputs(reference, backend_of(compiled)(x))[1]

    full = ov.Core().compile_model(str(results["openvino_int8"].path / "w_int8.xml"), "CPU")
    full_drop = 1.0 - metric(full)
    assert full_drop > 1e-4
    shape, batches = (1, 3, IMGSZ, IMGSZ), [x.numpy()]
    calibration = quantize.calibration_batches(quantize.calibration_files(tiny_data, 8), shape, 32)
    restore = AccuracyRestore(metric, batches, max_drop=0.7 * full_drop, max_reverted=8)
    settings = quantize_openvino_ir(float_ir / "w.xml", tmp_path / "r.xml", calibration, HEAD, restore=restore)
    restored = ov.Core().read_model(str(tmp_path / "r.xml"))
    assert settings["accuracy_control"] == {"max_drop": pytest.approx(0.7 * full_drop), "max_reverted": 8}
    assert settings["fake_quantize_nodes"] == fake_quantize_count(restored)
    assert fake_quantize_count(restored) < fake_quantize_count(ov.Core().read_model(
        str(results["openvino_int8"].path / "w_int8.xml")))
    # in float32 as the gate runs it: OpenVINO's default CPU precision may differ by release and CPU
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    assert 1.0 - metric(ov.Core().compile_model(restored, "CPU", f32)) <= 0.7 * full_drop
    # the gate's val pass runs a compiled model in memory exactly as the file it came from
    compiled_float = ov.Core().compile_model(str(float_ir / "w.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert quantize.val_map(float_ir, tiny_data, IMGSZ, 1, backend=backend_of(compiled_float)) == \
        pytest.approx(quantize.val_map(float_ir, tiny_data, IMGSZ, 1), abs=1e-6)


def test_attention_is_found_in_the_graph_and_the_float_head_nodes_by_prefix():
    import openvino.opset13 as opset

    x = opset.parameter([1, 4, 8], np.float32, name="x")
    weight = opset.constant(np.ones((8, 8), np.float32))
    linear = opset.matmul(x, weight, False, False)
    assert not has_attention(ov.Model([linear], [x]))  # a linear layer: constant weights
    scores = opset.matmul(linear, linear, False, True)
    assert has_attention(ov.Model([scores], [x]))  # q @ k^T: two activations
    softmax = opset.softmax(linear, -1)
    softmax.set_friendly_name("/model.9/Softmax")
    model = ov.Model([softmax], [x])
    assert has_attention(model) and float_head_nodes(model, "/model.9/") == ["/model.9/Softmax"]
    assert not has_attention(model, "/model.9/")  # a softmax in the head (anchor-free decoding)


def test_an_anchor_free_heads_inner_convs_are_quantised_and_its_output_convs_kept_float():
    """float_head_nodes walks the graph: a head conv that feeds another head conv (a branch conv of an
    anchor-free head) is quantised; the output conv and everything after it stay float."""
    import openvino.opset13 as opset

    def conv(x, name, channels=4):
        node = opset.convolution(x, opset.constant(np.ones((channels, 4, 1, 1), np.float32)), [1, 1], [0, 0],
                                 [0, 0], [1, 1])
        node.set_friendly_name(name)
        return node

    x = opset.parameter([1, 4, 8, 8], np.float32, name="x")
    body = conv(x, "/model.8/conv")
    inner = conv(body, "/model.9/cv2.0/cv2.0.0/conv")
    act = opset.sigmoid(inner)
    act.set_friendly_name("/model.9/cv2.0/cv2.0.0/act")
    output = conv(act, "/model.9/cv2.0/cv2.0.2")
    decode = opset.softmax(output, 1)
    decode.set_friendly_name("/model.9/Softmax")
    names = float_head_nodes(ov.Model([decode], [x]), "/model.9/")
    assert names == ["/model.9/cv2.0/cv2.0.2", "/model.9/Softmax"]
