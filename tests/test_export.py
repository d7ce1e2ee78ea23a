"""export.py and the inference front: verified exports, metadata, the three backend kinds, TTA."""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine.backend as backend_module
from export import main as export_main
from engine.backend import InferenceBackend, check_img_size, read_onnx_metadata, read_torchscript_metadata
from models.yolo import DetectionModel
from engine.checkpoint import checkpoint_dict, save_checkpoint
from engine.exporter import (
    RELATIVE_TOLERANCE, ExportError, compare_outputs, export_and_verify, export_model, target_path,
)
from utils.nms import non_max_suppression

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c"]
IMGSZ = 160


def calibrate_batchnorm(model: DetectionModel, size: int = IMGSZ) -> None:
    """Set every BatchNorm's running statistics from two random batches.

    With freshly initialised statistics the activations of an untrained network fade with depth, so its
    output hardly depends on the input (a completely different image changes it by ~1e-4) and an export
    comparison would prove little. Calibrated, the output follows the input and fusing folds real statistics.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in (10, 11):
            model(images((2, 3, size, size), seed))
    model.eval()


def make_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=len(NAMES))
    model.names = list(NAMES)
    calibrate_batchnorm(model)
    return save_checkpoint(checkpoint_dict(model), folder / "w.pt")


def images(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def assert_same_predictions(reference: torch.Tensor, output: torch.Tensor) -> None:
    max_abs, relative = compare_outputs(reference, output)
    assert relative <= RELATIVE_TOLERANCE, (max_abs, relative)


@pytest.fixture(scope="module")
def static_export(tmp_path_factory):
    """yolov5n (3 classes) exported to TorchScript and ONNX at 160x160, batch 1."""
    weights = make_checkpoint(tmp_path_factory.mktemp("static"))
    results = export_and_verify(weights, include=("torchscript", "onnx"), imgsz=IMGSZ, device="cpu")
    return weights, results


def test_exports_are_verified_and_written_next_to_the_weights(static_export):
    weights, results = static_export
    assert set(results) == {"torchscript", "onnx"}
    for fmt, result in results.items():
        assert result.path == weights.with_suffix(f".{fmt}") and result.path.is_file()
        (check,) = result.checks
        assert check.input_shape == (1, 3, IMGSZ, IMGSZ)
        assert check.max_abs_diff < 0.5 and check.relative_diff < 1e-4  # float32 reorderings only
    assert not [p for p in weights.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_metadata_round_trips_through_both_formats(static_export):
    weights, results = static_export
    metas = read_onnx_metadata(results["onnx"].path), read_torchscript_metadata(results["torchscript"].path)
    for meta in metas:
        assert meta["stride"] == 32 and meta["names"] == NAMES and meta["shape"] == [1, 3, IMGSZ, IMGSZ]
        assert meta["exporter"] == "vitdet" and meta["weights"] == "w.pt" and meta["dynamic"] is False
    for fmt in ("onnx", "torchscript"):
        backend = InferenceBackend(results[fmt].path)
        assert (backend.kind, backend.stride, backend.names) == (fmt, 32, NAMES)
        assert backend.fixed_shape == (1, IMGSZ, IMGSZ) and not backend.dynamic and not backend.fp16


def test_backend_gives_the_same_predictions_for_all_three_kinds(static_export):
    weights, results = static_export
    x = images((2, 3, IMGSZ, IMGSZ))  # batch 2 on batch-1 exports: run in chunks
    pytorch = InferenceBackend(weights)
    reference = pytorch(x)
    assert reference.shape == (2, 3 * (20 * 20 + 10 * 10 + 5 * 5), 5 + len(NAMES))
    kept = non_max_suppression(reference, conf_thres=0.001, max_det=100)
    assert all(len(k) for k in kept)
    for fmt in ("torchscript", "onnx"):
        output = InferenceBackend(results[fmt].path)(x)
        assert_same_predictions(reference, output)
        # what val.py's mAP is computed from: the same boxes, scores and classes after NMS
        for ref_det, det in zip(kept, non_max_suppression(output, conf_thres=0.001, max_det=100)):
            assert det.shape == ref_det.shape and torch.equal(det[:, 5], ref_det[:, 5])
            assert torch.allclose(det[:, :4], ref_det[:, :4], atol=0.5)  # pixels
            assert torch.allclose(det[:, 4], ref_det[:, 4], atol=1e-4)
    # the comparison means something: another input moves the output far beyond the tolerance
    assert (reference - pytorch(images((2, 3, IMGSZ, IMGSZ), seed=5))).abs().max() > 1
    unfused = InferenceBackend(weights, fuse=False)(x)
    assert_same_predictions(reference, unfused)


def test_fixed_shape_export_rejects_other_sizes_and_bad_inputs(static_export):
    _, results = static_export
    backend = InferenceBackend(results["onnx"].path)
    with pytest.raises(ValueError, match=r"exported for 160x160 input, got 192x160"):
        backend(images((1, 3, 192, IMGSZ)))
    with pytest.raises(ValueError, match="float images"):
        backend(torch.zeros(1, 3, IMGSZ, IMGSZ, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backend(images((3, IMGSZ, IMGSZ)))
    with pytest.raises(ValueError, match="--augment"):
        backend(images((1, 3, IMGSZ, IMGSZ)), augment=True)


def test_backend_rejects_unknown_missing_and_cpu_fp16_weights(tmp_path, static_export):
    weights, _ = static_export
    with pytest.raises(ValueError, match=r"unsupported format '\.h5'"):
        InferenceBackend(tmp_path / "model.h5")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        InferenceBackend(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="CUDA"):
        InferenceBackend(weights, device="cpu", fp16=True)


def test_test_time_augmentation_rows_and_unflipped_part(static_export):
    weights, _ = static_export
    backend = InferenceBackend(weights)
    x = images((1, 3, 192, IMGSZ))
    plain, augmented = backend(x), backend(x, augment=True)
    # scale 1: all but the stride-32 rows; 0.83 -> 160x160: all rows; 0.67 -> 160x128: all but stride 8
    full = 3 * (24 * 20 + 12 * 10 + 6 * 5)
    expected = (full - 3 * 6 * 5) + 3 * (20 * 20 + 10 * 10 + 5 * 5) + 3 * (10 * 8 + 5 * 4)
    assert augmented.shape == (1, expected, 5 + len(NAMES))
    assert torch.allclose(augmented[:, : full - 90], plain[:, : full - 90], atol=1e-5)
    # the middle pass, recomputed by hand: flip left-right, resize to 83% (159x132), pad to 160x160
    small = F.interpolate(x.flip(3), size=(159, 132), mode="bilinear", align_corners=False)
    middle = backend.model(F.pad(small, [0, 28, 0, 1], value=0.447))[0]
    middle[..., :4] /= 0.83
    middle[..., 0] = IMGSZ - middle[..., 0]
    assert torch.allclose(augmented[:, full - 90 : full - 90 + 3 * 525], middle, atol=1e-4)


@pytest.fixture(scope="module")
def cli_dynamic_export(tmp_path_factory):
    """`python export.py --include onnx --dynamic --imgsz 128` run as a subprocess."""
    weights = make_checkpoint(tmp_path_factory.mktemp("dynamic"))
    done = subprocess.run(
        [sys.executable, "export.py", "--weights", str(weights), "--include", "onnx", "--dynamic",
         "--imgsz", "128"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    return weights, done


def test_cli_exports_and_reports_the_difference(cli_dynamic_export):
    weights, done = cli_dynamic_export
    assert done.returncode == 0, done.stderr
    for shape in ("(1, 3, 128, 128)", "(2, 3, 160, 192)"):  # the export size and a second dynamic size
        assert f"onnx: verified on input {shape}: max abs diff" in done.stderr
    assert "Export complete" in done.stderr
    assert read_onnx_metadata(weights.with_suffix(".onnx"))["dynamic"] is True


def test_dynamic_onnx_accepts_two_input_sizes(cli_dynamic_export):
    weights, _ = cli_dynamic_export
    backend = InferenceBackend(weights.with_suffix(".onnx"))
    assert backend.dynamic and backend.fixed_shape is None
    reference = InferenceBackend(weights)
    for shape in ((1, 3, 128, 160), (2, 3, 224, 96)):
        x = images(shape)
        assert_same_predictions(reference(x), backend(x))


def test_broken_export_fails_with_non_zero_exit_and_leaves_no_file(tmp_path, monkeypatch, caplog):
    weights = make_checkpoint(tmp_path)
    real_call = backend_module._OnnxRunner.__call__
    monkeypatch.setattr(backend_module._OnnxRunner, "__call__", lambda self, im: real_call(self, im) + 0.01)
    with caplog.at_level(logging.ERROR, logger="vitdet"):
        status = export_main(["--weights", str(weights), "--include", "onnx", "--imgsz", str(IMGSZ)])
    assert status == 1
    assert any(re.search(r"export failed: onnx export failed verification .* relative diff 0\.01\d* > tolerance",
                         r.getMessage()) for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # neither the export nor a temp file


def test_foreign_files_are_never_overwritten_but_own_exports_are(tmp_path, static_export):
    weights = make_checkpoint(tmp_path)
    foreign = target_path(weights, "onnx")
    foreign.write_text("the user's own file")
    with pytest.raises(FileExistsError, match="not this project's export of w.pt"):
        export_model(weights, include=("torchscript", "onnx"), imgsz=IMGSZ)
    assert foreign.read_text() == "the user's own file"
    assert not target_path(weights, "torchscript").exists()  # refused before any work
    shutil.copy(static_export[1]["onnx"].path, foreign)  # our earlier export of a w.pt: replaceable
    replaced = export_model(weights, include=("onnx",), imgsz=(IMGSZ, 128))["onnx"]
    assert replaced == foreign and read_onnx_metadata(replaced)["shape"] == [1, 3, IMGSZ, 128]
    renamed = weights.rename(tmp_path / "other.pt")
    shutil.copy(replaced, target_path(renamed, "onnx"))  # our export, but of w.pt, not other.pt
    with pytest.raises(FileExistsError, match="other.pt"):
        export_model(renamed, include=("onnx",), imgsz=IMGSZ)


def test_compare_outputs_measures_relative_error():
    reference = torch.zeros(1, 2, 8)
    reference[..., :4] = 200.0
    output = reference.clone()
    output[0, 0, 0] += 0.1  # box: 0.1 / 200
    output[0, 1, 5] += 0.0004  # score: absolute
    max_abs, relative = compare_outputs(reference, output)
    assert max_abs == pytest.approx(0.1, rel=1e-4) and relative == pytest.approx(0.0005, rel=1e-3)
    output[0, 0, 6] = float("nan")
    assert compare_outputs(reference, output)[1] == float("inf")
    with pytest.raises(ExportError, match="output shape"):
        compare_outputs(reference, reference[:, :1])


def test_bad_requests_are_refused_with_messages(tmp_path, static_export):
    weights, _ = static_export
    with pytest.raises(ValueError, match="unknown or no format"):
        export_model(weights, include=("tflite",))
    with pytest.raises(ValueError, match="CUDA"):
        export_model(weights, include=("onnx",), half=True, device="cpu")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        export_model(tmp_path / "nothing.pt")
    assert check_img_size(150, 32) == (160, 160) and check_img_size([320, 200], 32) == (320, 224)


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@pytest.mark.skipif(openvino_installed(), reason="openvino is installed; the export itself is tested")
def test_openvino_without_the_package_is_a_clear_error(static_export):
    with pytest.raises(ValueError, match="pip install openvino"):
        export_model(static_export[0], include=("openvino",), imgsz=IMGSZ)


@pytest.mark.slow
@pytest.mark.skipif(not openvino_installed(), reason="openvino is not installed")
def test_openvino_export_is_verified(tmp_path):
    weights = make_checkpoint(tmp_path)
    result = export_and_verify(weights, include=("openvino",), imgsz=IMGSZ)["openvino"]
    assert result.path == tmp_path / "w_openvino_model"
    assert {p.name for p in result.path.iterdir()} == {"w.xml", "w.bin", "metadata.yaml"}
    assert result.checks[0].relative_diff <= RELATIVE_TOLERANCE


BACKBONE_YAMLS = sorted(p.name for p in (ROOT / "configs" / "models").glob("yolov5-*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", BACKBONE_YAMLS)
def test_backbone_models_export_to_onnx_and_verify(cfg, tmp_path):
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=len(NAMES))
    model.names = list(NAMES)
    calibrate_batchnorm(model, size=256)
    weights = save_checkpoint(checkpoint_dict(model), tmp_path / f"{Path(cfg).stem}.pt")
    results = export_and_verify(weights, include=("onnx",), imgsz=256)
    assert results["onnx"].checks[0].relative_diff <= RELATIVE_TOLERANCE
    assert InferenceBackend(results["onnx"].path).names == NAMES


@pytest.mark.slow
def test_detect_runs_on_a_fixed_shape_onnx_export(static_export, tmp_path):
    import cv2
    import numpy as np

    from engine.predictor import run

    _, results = static_export
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "x.jpg"), np.full((240, 320, 3), 90, np.uint8))
    save_dir = run(results["onnx"].path, folder, imgsz=640, device="cpu", conf_thres=0.001, max_det=3,
                   save_txt=True, project=tmp_path, name="exp")
    assert cv2.imread(str(save_dir / "x.jpg")).shape == (240, 320, 3)
    lines = (save_dir / "labels" / "x.txt").read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 5 for line in lines)

