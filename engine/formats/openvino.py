"""OpenVINO IR (`<stem>_openvino_model/` with <stem>.xml/.bin and metadata.yaml), run on OpenVINO's CPU
device: float32 exports (bf16 inference precision on native-bf16 CPUs with --bf16) and export.py
--int8's INT8 IR (`<stem>_int8_openvino_model/`, NNCF or QDQ-converted, engine.quantize_openvino)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.formats.base import (
    Capabilities,
    Format,
    RunOptions,
    WriteOptions,
    fixed_shape_from_metadata,
    names_from_metadata,
    stride_from_metadata,
)
from engine.formats.onnx import write_onnx

LOGGER = logging.getLogger("vitdet.engine.backend")
SUFFIX = "_openvino_model"  # export.py --include openvino writes <stem>_openvino_model/


def openvino_model_files(path: str | Path) -> tuple[Path, Path]:
    """(IR .xml, metadata.yaml) of an OpenVINO export given as its folder or its .xml file."""
    path = Path(path)
    if path.is_dir():
        xmls = sorted(path.glob("*.xml"))
        if len(xmls) != 1:
            raise FileNotFoundError(f"{path}: expected one OpenVINO .xml model in the folder, "
                                    f"found {len(xmls)}")
        return xmls[0], path / "metadata.yaml"
    return path, path.parent / "metadata.yaml"


def read_openvino_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata.yaml beside an OpenVINO IR (folder or .xml); {} when absent."""
    meta_file = openvino_model_files(path)[1]
    if not meta_file.is_file():
        return {}
    meta = yaml.safe_load(meta_file.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: must hold a mapping, found {type(meta).__name__}")
    return meta


def write_openvino_from_onnx(onnx_file: Path, tmp_dir: Path, meta: dict[str, Any], stem: str) -> None:
    """Convert an ONNX file (float, or INT8 QDQ: OpenVINO runs its quantised ops in int8) into
    <stem>.xml/.bin in `tmp_dir`, with metadata.yaml (`meta` plus imgsz and batch)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_file)), str(tmp_dir / f"{stem}.xml"), compress_to_fp16=False)
    write_openvino_metadata(tmp_dir, meta)


def write_openvino_metadata(folder: Path, meta: dict[str, Any]) -> None:
    """metadata.yaml: `meta` plus imgsz [H, W] and batch (as Ultralytics writes them)."""
    shape = meta["shape"]
    ov_meta = {**meta, "imgsz": [int(shape[2]), int(shape[3])], "batch": int(shape[0])}
    (folder / "metadata.yaml").write_text(yaml.safe_dump(ov_meta, sort_keys=False))


class OpenVINORunner:
    """An OpenVINO IR written by export.py, compiled for OpenVINO's CPU device in float32, or with
    bf16=True in OpenVINO's bf16 inference precision. The precision is always set: OpenVINO's own
    default on CPUs with native bf16 (AVX-512 BF16, AMX) is bf16, which would make a float32 export
    silently differ from its model by bf16 rounding."""

    fp16, input_dtype = False, torch.float32

    def __init__(self, path: Path, device: torch.device, bf16: bool = False):
        import openvino as ov

        if device.type != "cpu":
            LOGGER.warning(f"{path}: OpenVINO runs on its CPU device here; outputs are moved to {device}")
        xml, _ = openvino_model_files(path)
        meta = read_openvino_metadata(path)
        core = ov.Core()
        model = core.read_model(str(xml))
        self.model = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"})
        self.request = self.model.create_infer_request()
        self.stride = stride_from_metadata(meta, path)
        out_dim = model.output(0).get_partial_shape()[-1]
        nc = out_dim.get_length() - 5 if out_dim.is_static else meta.get("nc")
        self.names = names_from_metadata(meta, nc, path)
        self.dynamic = model.input(0).get_partial_shape().is_dynamic
        self.fixed_shape = None if self.dynamic else fixed_shape_from_metadata(meta, path)
        self.bf16 = bf16
        self.precision = "bf16" if bf16 else str(meta.get("precision") or "fp32")

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        self.request.infer({0: im.detach().cpu().float().numpy()})
        out = torch.from_numpy(self.request.get_output_tensor(0).data.copy())
        return out.to(im.device)


class OpenVINOFormat(Format):
    name, suffix, is_dir = "openvino", SUFFIX, True
    capabilities = Capabilities(dynamic=True, bf16=True, bf16_native_only=True, int8=True, batch=True)

    def target(self, weights: Path, int8: bool = False) -> Path:
        return weights.with_name(f"{weights.stem}{'_int8' if int8 else ''}{SUFFIX}")

    def matches(self, path: Path) -> bool:
        """The folder (by its name, or any folder holding an .xml) or the .xml inside it."""
        if path.name.endswith(SUFFIX) or path.suffix == ".xml":
            return True
        return path.is_dir() and any(path.glob("*.xml"))

    def exists(self, path: Path) -> bool:
        return path.exists()

    def read_metadata(self, path: Path) -> dict[str, Any]:
        return read_openvino_metadata(path)

    def write(self, model, sample: torch.Tensor, tmp: Path, meta: dict[str, Any],
              options: WriteOptions) -> None:
        """OpenVINO IR (<stem>.xml/.bin) converted from an ONNX export, plus metadata.yaml."""
        from utils.files import temp_name_beside

        onnx_file = temp_name_beside(tmp / f"{options.stem}.onnx", keep_suffix=True)
        try:
            write_onnx(model, sample, onnx_file, meta, options.opset, options.dynamic, simplify=False)
            write_openvino_from_onnx(onnx_file, tmp, meta, options.stem)
        finally:
            onnx_file.unlink(missing_ok=True)

    def runner(self, path: Path, device: torch.device, options: RunOptions) -> OpenVINORunner:
        return OpenVINORunner(path, device, options.bf16)


FORMAT = OpenVINOFormat()
