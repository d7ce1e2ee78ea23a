"""benchmarks.py --files: existing files (ours, and another project's exports such as YOLOv5's OpenVINO
folder, whose metadata.yaml has names as {id: name} and no input shape) timed side by side."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import benchmarks
from engine.backend import InferenceBackend
from engine.exporter import export_and_verify
from engine.latency import parse_file_args

pytest.importorskip("openvino")


def foreign_ir(ours, folder):
    """A copy of our static IR with metadata as YOLOv5's export.py writes it: <stem>.yaml beside the
    .xml holding only stride and {id: name}."""
    shutil.copytree(ours, folder)
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    (folder / "metadata.yaml").unlink()
    xml = next(folder.glob("*.xml"))
    xml.with_suffix(".yaml").write_text(yaml.safe_dump(
        {"stride": meta["stride"], "names": dict(enumerate(meta["names"]))}))
    return folder


def test_files_are_timed_side_by_side_including_a_foreign_ir(tiny_checkpoint, tmp_path, capsys):
    weights = tmp_path / tiny_checkpoint.name
    shutil.copy(tiny_checkpoint, weights)
    paths = {fmt: r.path for fmt, r in export_and_verify(weights, include=("onnx", "openvino"),
                                                           imgsz=(64, 96)).items()}
    y5 = foreign_ir(paths["openvino"], tmp_path / "y5_openvino_model")
    backend = InferenceBackend(y5)
    assert backend.fixed_shape == (1, 64, 96) and backend.names == InferenceBackend(weights).names
    assert backend.stride == 32 and backend.precision == "fp32"
    x = torch.rand(1, 3, 64, 96)
    assert torch.allclose(backend(x), InferenceBackend(paths["openvino"])(x))
    out = tmp_path / "side"
    assert benchmarks.main(["--files", f"pt={weights}", f"ov={paths['openvino']}", f"y5={y5}",
                            str(paths["onnx"]), "--runs", "3", "--warmup", "1", "--imgsz", "64",
                            "--out", str(out)]) == 0
    table = (tmp_path / "side.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ratio" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == ["pt", "ov", "y5", paths["onnx"].name]
    assert rows[0].endswith("| 1.00 |") and "| 64x64 |" in rows[0] and "| 64x96 |" in rows[2]
    assert (tmp_path / "side.csv").read_text().startswith("file,path,precision,input,median_ms,ratio")
    assert "Machine:" in capsys.readouterr().out


def test_file_arguments_are_checked(tmp_path):
    present = tmp_path / "a.onnx"
    present.write_bytes(b"")
    assert parse_file_args([f"x={present}", str(present)]) == {"x": present, "a.onnx": present}
    with pytest.raises(FileNotFoundError, match=r"--files y=.*missing.onnx does not exist"):
        parse_file_args([f"y={tmp_path / 'missing.onnx'}"])
    with pytest.raises(ValueError, match="the label x is given twice"):
        parse_file_args([f"x={present}", f"x={present}"])
