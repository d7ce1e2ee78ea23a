"""OpenVINO as a runtime: export.py --include openvino writes <stem>_openvino_model/, which
InferenceBackend (and so detect.py and val.py) runs on OpenVINO's CPU device."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from data.builtin import CLASS_NAMES
from engine.backend import InferenceBackend, read_onnx_metadata
from engine.checkpoint import checkpoint_dict, save_checkpoint
from engine.exporter import RELATIVE_TOLERANCE, compare_outputs, export_and_verify
from models.yolo import DetectionModel
from tests.test_export import calibrate_batchnorm

pytest.importorskip("openvino")
IMGSZ = 96


def make_weights(folder):
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=len(CLASS_NAMES))
    model.names = list(CLASS_NAMES)
    calibrate_batchnorm(model, IMGSZ)
    return save_checkpoint(checkpoint_dict(model), folder / "w.pt")


@pytest.fixture(scope="module")
def dynamic_ir(tmp_path_factory):
    weights = make_weights(tmp_path_factory.mktemp("ov_dynamic"))
    return weights, export_and_verify(weights, include=("openvino",), imgsz=IMGSZ, dynamic=True)["openvino"]


def test_export_writes_the_ir_and_its_metadata(dynamic_ir):
    weights, result = dynamic_ir
    assert result.path == weights.with_name("w_openvino_model")
    assert {p.name for p in result.path.iterdir()} == {"w.xml", "w.bin", "metadata.yaml"}
    meta = yaml.safe_load((result.path / "metadata.yaml").read_text())
    assert meta["stride"] == 32 and meta["names"] == list(CLASS_NAMES) and meta["dynamic"] is True
    assert meta["imgsz"] == [IMGSZ, IMGSZ] and meta["batch"] == 1 and meta["precision"] == "fp32"
    assert [c.input_shape for c in result.checks] == [(1, 3, IMGSZ, IMGSZ), (2, 3, IMGSZ + 32, IMGSZ + 64)]
    assert all(c.relative_diff <= RELATIVE_TOLERANCE for c in result.checks)


def test_backend_runs_the_folder_and_the_xml_like_eager(dynamic_ir):
    weights, result = dynamic_ir
    pytorch = InferenceBackend(weights)
    for path in (result.path, result.path / "w.xml"):
        backend = InferenceBackend(path)
        assert (backend.kind, backend.stride, backend.names, backend.precision) == ("openvino", 32,
                                                                                    list(CLASS_NAMES), "fp32")
        assert backend.dynamic and backend.fixed_shape is None
        for shape in ((1, 3, IMGSZ, IMGSZ), (3, 3, 128, 64)):  # any batch and size: exported dynamic
            x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0]))
            reference = pytorch(x)
            _, relative = compare_outputs(reference, backend(x))
            assert relative <= RELATIVE_TOLERANCE
            other = pytorch(torch.rand(shape, generator=torch.Generator().manual_seed(9)))
            assert compare_outputs(reference, other)[1] > 100 * RELATIVE_TOLERANCE  # a check that can fail


def test_openvino_runs_in_float32_unless_bf16_is_asked_and_bf16_only_where_native(tmp_path, monkeypatch):
    # OpenVINO's own default on CPUs with native bf16 is bf16: a float32 export must not silently round
    from engine import precision
    from tests.test_int8 import make_weights as shallow_weights  # a deep random net amplifies bf16 rounding

    weights = shallow_weights(tmp_path)
    folder = export_and_verify(weights, include=("openvino",), imgsz=IMGSZ, dynamic=True)["openvino"].path
    backend = InferenceBackend(folder)
    assert str(backend.model.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
    x = torch.rand((2, 3, IMGSZ, IMGSZ), generator=torch.Generator().manual_seed(1))
    reference = InferenceBackend(weights)(x)
    if precision.cpu_bf16_support().native:
        bf16 = InferenceBackend(folder, bf16=True)
        assert bf16.precision == "bf16"
        assert 1e-4 < compare_outputs(reference, bf16(x))[1] < 0.02  # bf16 really ran, and stayed close
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: precision.Bf16Support(False, "test: AVX2"))
    with pytest.raises(ValueError, match=r"w_openvino_model: this CPU has no native bf16 .*float32"):
        InferenceBackend(folder, bf16=True)


def test_fixed_shape_ir_accepts_only_its_shape(tmp_path):
    weights = make_weights(tmp_path)
    result = export_and_verify(weights, include=("openvino",), imgsz=IMGSZ)["openvino"]
    backend = InferenceBackend(result.path)
    assert not backend.dynamic and backend.fixed_shape == (1, IMGSZ, IMGSZ)
    assert backend(torch.rand(2, 3, IMGSZ, IMGSZ)).shape[0] == 2  # batches run in chunks
    with pytest.raises(ValueError, match="exported for 96x96 input"):
        backend(torch.rand(1, 3, 128, IMGSZ))


def test_val_and_detect_run_the_openvino_folder(dynamic_ir, tiny_data, tmp_path):
    from engine.predictor import run
    from val import run as val_run

    weights, result = dynamic_ir
    ov_results, _ = val_run(weights=result.path, data=str(tiny_data), imgsz=IMGSZ, workers=0, device="cpu",
                            plots=False, project=tmp_path, name="ov")
    pt_results, _ = val_run(weights=weights, data=str(tiny_data), imgsz=IMGSZ, workers=0, device="cpu",
                            plots=False, project=tmp_path, name="pt")
    assert ov_results.map == pytest.approx(pt_results.map, abs=1e-3)
    assert ov_results.map50 == pytest.approx(pt_results.map50, abs=1e-3)
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "x.jpg"), np.full((120, 160, 3), 90, np.uint8))
    save_dir = run(result.path, folder, imgsz=IMGSZ, device="cpu", conf_thres=0.001, max_det=3, save_txt=True,
                   project=tmp_path, name="detect")
    assert len((save_dir / "labels" / "x.txt").read_text().splitlines()) == 3


def test_missing_or_empty_openvino_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights not found"):
        InferenceBackend(tmp_path / "nothing_openvino_model")
    empty = tmp_path / "empty_openvino_model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected one OpenVINO \.xml model in the folder, found 0"):
        InferenceBackend(empty)


def test_levit_exports_to_a_dynamic_openvino_model_that_matches_at_other_sizes(tmp_path):
    # LeViT's shrink attention once took x[:, :, ::2, ::2]; OpenVINO's dynamic shape inference sized that
    # strided slice wrongly and the export failed verification at its second input size
    torch.manual_seed(0)
    model = DetectionModel("yolov5-levit.yaml", nc=len(CLASS_NAMES))
    model.names = list(CLASS_NAMES)
    weights = save_checkpoint(checkpoint_dict(model), tmp_path / "levit.pt")
    result = export_and_verify(weights, include=("openvino",), imgsz=128, dynamic=True)["openvino"]
    assert [c.input_shape for c in result.checks] == [(1, 3, 128, 128), (2, 3, 160, 192)]
    assert all(c.relative_diff <= RELATIVE_TOLERANCE for c in result.checks)
    backend = InferenceBackend(result.path)
    x = torch.rand((1, 3, 96, 224), generator=torch.Generator().manual_seed(0))  # odd stride-16 map: 6x14
    _, relative = compare_outputs(InferenceBackend(weights)(x), backend(x))
    assert relative <= RELATIVE_TOLERANCE


def test_int8_with_openvino_also_writes_an_int8_ir_that_runs_quantised(tmp_path, tiny_data):
    import openvino as ov

    from tests.test_int8 import make_weights as shallow_weights  # a deep random net defeats any INT8 check

    weights = shallow_weights(tmp_path)
    results = export_and_verify(weights, include=("onnx", "openvino"), imgsz=IMGSZ, int8=True, data=tiny_data,
                                calib=8, openvino_int8="qdq")
    folder = results["openvino_int8"].path
    assert folder == weights.with_name("w_int8_openvino_model")
    assert {p.name for p in folder.iterdir()} == {"w_int8.xml", "w_int8.bin", "metadata.yaml"}
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    onnx_meta = read_onnx_metadata(results["onnx_int8"].path)
    assert meta["precision"] == "int8" and meta["int8"] == onnx_meta["int8"]
    assert meta["names"] == list(CLASS_NAMES)
    assert meta["exporter"] == "vitdet" and meta["weights"] == "w.pt" and meta["imgsz"] == [IMGSZ, IMGSZ]
    metrics = results["openvino_int8"].metrics
    assert metrics["ops"] == "full" and metrics["method"] == "qdq"
    assert metrics["drop"] == pytest.approx(metrics["map_float"] - metrics["map_int8"])

    def fake_quantize_ops(xml):
        return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(xml)).get_ops())
    assert fake_quantize_ops(folder / "w_int8.xml") >= 5  # the five body convs' inputs and weights at least
    assert fake_quantize_ops(results["openvino"].path / "w.xml") == 0
    backend = InferenceBackend(folder)
    assert (backend.kind, backend.precision, backend.stride) == ("openvino", "int8", 32)
    x = torch.rand((1, 3, IMGSZ, IMGSZ), generator=torch.Generator().manual_seed(3))
    float_out, ort_int8 = InferenceBackend(weights)(x), InferenceBackend(results["onnx_int8"].path)(x)
    out = backend(x)
    to_float, to_ort_int8 = compare_outputs(float_out, out)[1], compare_outputs(ort_int8, out)[1]
    assert to_float > 1e-3 and to_ort_int8 < to_float / 3  # it rounds like the INT8 file, not like float


def test_openvino_int8_ir_failing_the_gate_is_not_written_and_a_foreign_folder_is_kept(
        tmp_path, tiny_data, monkeypatch):
    from engine import quantize
    from engine.exporter import ExportError
    from tests.test_int8 import make_weights as shallow_weights

    weights = shallow_weights(tmp_path)
    foreign = tmp_path / "w_int8_openvino_model"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    request = dict(include=("onnx", "openvino"), imgsz=IMGSZ, int8=True, data=tiny_data, calib=4,
                   openvino_int8="qdq")
    with pytest.raises(FileExistsError, match="w_int8_openvino_model exists and is not this project's"):
        export_and_verify(weights, **request)
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
    foreign.joinpath("mine.txt").unlink()
    foreign.rmdir()
    monkeypatch.setattr(quantize, "val_map", lambda path, *a, **k: 0.2 if Path(path).is_dir() else 0.7)
    expected = (r"openvino_int8 export of w_int8_openvino_model failed: INT8 mAP50-95 0\.2000 vs float "
                r"0\.7000: drop 0\.5000 > --int8-tolerance 0\.01")
    with pytest.raises(ExportError, match=expected):
        export_and_verify(weights, **request)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.onnx", "w.pt", "w_int8.onnx", "w_openvino_model"]
