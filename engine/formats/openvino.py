"""OpenVINO IR (`<stem>_openvino_model/` with <stem>.xml/.bin and metadata.yaml), run on OpenVINO's CPU
device: float32 exports (bf16 inference precision on native-bf16 CPUs with --bf16) and export.py
--int8's INT8 IR (`<stem>_int8_openvino_model/`, NNCF or QDQ-converted, engine.quantize_openvino)."""

from __future__ import annotations

import logging
from collections.abc import Callable
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
from engine.formats.int8 import LOGGER as EXPORT_LOG  # INT8 writers log as the exporter
from engine.formats.int8 import ExportError, ExportResult, Int8GateError, Int8Job, size_mb
from engine.formats.onnx import write_onnx

LOGGER = logging.getLogger("vitdet.engine.backend")
SUFFIX = "_openvino_model"  # export.py --include openvino writes <stem>_openvino_model/


def openvino_model_files(path: str | Path) -> tuple[Path, Path]:
    """(IR .xml, metadata file) of an OpenVINO export given as its folder or its .xml file. The metadata
    is our metadata.yaml, else the `<stem>.yaml` YOLOv5's export.py writes beside the IR (stride,
    names), so its exports run here too."""
    path = Path(path)
    if path.is_dir():
        xmls = sorted(path.glob("*.xml"))
        if len(xmls) != 1:
            raise FileNotFoundError(f"{path}: expected one OpenVINO .xml model in the folder, "
                                    f"found {len(xmls)}")
        path = xmls[0]
    ours, yolov5 = path.parent / "metadata.yaml", path.with_suffix(".yaml")
    return path, ours if ours.is_file() or not yolov5.is_file() else yolov5


def read_openvino_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata beside an OpenVINO IR (folder or .xml; see openvino_model_files); {} when absent."""
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


def _static_shape(model, meta: dict[str, Any], path: Path) -> tuple[int, int, int] | None:
    """(B, H, W) of a static IR: from its metadata, else (an IR written by another project, e.g.
    YOLOv5's export.py, whose metadata has no `shape`) from the model's own input."""
    if "shape" not in meta:
        dims = [d.get_length() for d in model.input(0).get_partial_shape()]
        if len(dims) == 4:
            return dims[0], dims[2], dims[3]
    return fixed_shape_from_metadata(meta, path)


def _precision_of_graph(model) -> str:
    """'int8' for an IR with quantisation nodes (another project's INT8 export, without our metadata)."""
    return "int8" if any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) else "fp32"


class OpenVINORunner:
    """An OpenVINO IR written by export.py, compiled for OpenVINO's CPU device in float32, or with
    bf16=True in OpenVINO's bf16 inference precision. The precision is always set: OpenVINO's own
    default on CPUs with native bf16 (AVX-512 BF16, AMX) is bf16, which would make a float32 export
    silently differ from its model by bf16 rounding."""

    fp16, input_dtype = False, torch.float32

    def __init__(self, path: Path, device: torch.device, bf16: bool = False, compiled=None):
        """compiled: an ov.CompiledModel of the same graph to run instead of compiling `path`'s (NNCF's
        accuracy control validates its candidate models through this runner; `path` gives the metadata)."""
        import openvino as ov

        if device.type != "cpu":
            LOGGER.warning(f"{path}: OpenVINO runs on its CPU device here; outputs are moved to {device}")
        xml, _ = openvino_model_files(path)
        meta = read_openvino_metadata(path)
        core = ov.Core()
        model = core.read_model(str(xml))
        self.model = compiled if compiled is not None else core.compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"})
        self.request = self.model.create_infer_request()
        self.stride = stride_from_metadata(meta, path)
        out_dim = model.output(0).get_partial_shape()[-1]
        nc = out_dim.get_length() - 5 if out_dim.is_static else meta.get("nc")
        self.names = names_from_metadata(meta, nc, path)
        self.dynamic = model.input(0).get_partial_shape().is_dynamic
        self.fixed_shape = None if self.dynamic else _static_shape(model, meta, path)
        self.bf16 = bf16
        self.precision = "bf16" if bf16 else str(meta.get("precision") or _precision_of_graph(model))

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        self.request.infer({0: im.detach().cpu().float().numpy()})
        out = torch.from_numpy(self.request.get_output_tensor(0).data.copy())
        return out.to(im.device)


# -- INT8: <stem>_int8_openvino_model/ ---------------------------------------------------------------
# How the INT8 IR is made: 'nncf' quantises the verified float IR with NNCF (engine.quantize_openvino),
# 'qdq' converts the accepted INT8 ONNX file. NNCF is the default: on yolov5s at 640 (AVX2 machine, under
# load, so provisional) its IR was at least as fast as the converted QDQ file and it keeps the decode in
# float; benchmarks.py's openvino_int8_ms / openvino_nncf_ms columns compare the two on your CPU.
OPENVINO_INT8_METHODS = ("nncf", "qdq")
DEFAULT_OPENVINO_INT8 = "nncf"
OPENVINO_INT8_HOW = {"nncf": "NNCF post-training quantisation of the float IR",
                     "qdq": "the accepted INT8 (QDQ) ONNX file converted to an IR"}


def export_openvino_qdq(onnx_int8: ExportResult, target: Path, job: Int8Job) -> ExportResult:
    """The accepted INT8 ONNX file converted to an IR (OpenVINO runs its quantise/dequantise pairs as
    int8 ops), accepted only if its own val mAP50-95 is within the tolerance of the float ONNX model's
    (the same gate as the ONNX file: the two runtimes fuse and round differently)."""
    from engine.formats.onnx import read_onnx_metadata

    meta = read_onnx_metadata(onnx_int8.path)

    def write(tmp: Path) -> None:
        write_openvino_from_onnx(onnx_int8.path, tmp, meta, f"{job.stem}_int8")

    result = _gate_int8_dir(target, write, job, onnx_int8.metrics["map_float"])
    result.metrics.update(ops=onnx_int8.metrics["ops"], method="qdq")
    return result


def export_openvino_nncf(float_ir: Path, target: Path, job: Int8Job) -> ExportResult:
    """NNCF post-training quantisation of the verified float IR `float_ir` (engine.quantize_openvino),
    accepted only if its val mAP50-95 is within the tolerance of the float IR's own."""
    from engine.quantize_openvino import quantize_openvino_ir

    xml, _ = openvino_model_files(float_ir)
    meta = read_openvino_metadata(float_ir)
    map_float = job.calibration.val_map(float_ir)
    preset = job.options.int8_preset
    settings: dict[str, Any] = {}

    def writer(restore) -> Callable[[Path], None]:
        def write(tmp: Path) -> None:
            out_xml = tmp / f"{xml.stem}_int8.xml"
            settings.update(quantize_openvino_ir(xml, out_xml, job.calibration.batches, job.head_prefix,
                                                 preset, restore=restore))
            settings["data"] = job.calibration.data_name
            ov_meta = {**meta, "precision": "int8", "int8": settings}
            (tmp / "metadata.yaml").write_text(yaml.safe_dump(ov_meta, sort_keys=False))
        return write

    try:
        result = _gate_int8_dir(target, writer(None), job, map_float)
    except Int8GateError:
        if job.calibration.tolerance < 0 or map_float <= 0:
            raise  # a tolerance no model meets, or no float mAP for NNCF to measure drops from
        EXPORT_LOG.info("openvino_int8: the fully quantised IR missed the gate; NNCF accuracy control now "
                        "returns the layers that cost most accuracy to float until the drop is within "
                        "--int8-tolerance")
        restore = _accuracy_restore(float_ir, job)
        try:
            result = _gate_int8_dir(target, writer(restore), job, map_float)
        except Int8GateError as err:
            raise Int8GateError(f"{err}; NNCF accuracy control returned up to {restore.max_reverted} layer "
                                f"groups to float without meeting it: try --openvino-int8 qdq with onnx in "
                                "--include (the ONNX Runtime INT8 file converted), or --calib with more "
                                "images") from err
    result.metrics.update(ops=f"nncf {preset}", method="nncf", model_type=settings.get("model_type"),
                          accuracy_control="accuracy_control" in settings)
    return result


RANKING_IMAGES = 16  # val images on which NNCF's accuracy control ranks the quantised layers


def _accuracy_restore(float_ir: Path, job: Int8Job):
    """NNCF accuracy control's inputs: each candidate model NNCF compiles is scored by the gate's own val
    pass (mAP50-95), run through our OpenVINO runner (the float IR gives the metadata)."""
    from engine.backend import InferenceBackend
    from engine.quantize_openvino import AccuracyRestore

    cpu = torch.device("cpu")

    def validate(compiled) -> float:
        runner = OpenVINORunner(float_ir, cpu, compiled=compiled)
        backend = InferenceBackend.from_runner(float_ir, runner, cpu)
        return job.calibration.val_map(float_ir, backend=backend)

    return AccuracyRestore(validate, job.calibration.val_batches(RANKING_IMAGES), job.calibration.tolerance)


def _gate_int8_dir(target: Path, write: Callable[[Path], None], job: Int8Job,
                   map_float: float) -> ExportResult:
    """Write an INT8 IR into a temporary folder, log its output distance, and rename it to `target` only
    when its val mAP50-95 is within the tolerance of `map_float`."""
    from utils.files import atomic_dir

    with atomic_dir(target) as tmp:
        try:
            write(tmp)
        except Exception as err:
            raise ExportError(f"openvino_int8 export of {target.name} failed: {type(err).__name__}: "
                              f"{err}") from err
        checks = job.output_checks("openvino_int8", tmp)
        map_int8 = job.calibration.val_map(tmp)
        drop = job.gate("openvino_int8", target, map_float, map_int8)
    EXPORT_LOG.info(f"openvino_int8: export success, saved as {target} ({size_mb(target):.1f} MB)")
    return ExportResult(target, checks, {"map_float": map_float, "map_int8": map_int8, "drop": drop})


class OpenVINOFormat(Format):
    name, suffix, is_dir = "openvino", SUFFIX, True
    capabilities = Capabilities(dynamic=True, bf16=True, bf16_native_only=True, int8=True, batch=True)

    def check_request(self, options, requested) -> None:
        if options.half:
            raise ValueError("--half is for CUDA requested; OpenVINO is exported in float32")
        try:
            import openvino  # noqa: F401
        except ImportError as err:
            raise ValueError("--include openvino needs the openvino package (pip install openvino)") from err

    def check_int8_request(self, options, requested) -> None:
        from engine.quantize_openvino import PRESETS

        if options.openvino_int8 not in OPENVINO_INT8_METHODS:
            raise ValueError(f"--openvino-int8 {options.openvino_int8}: expected one of "
                             f"{', '.join(OPENVINO_INT8_METHODS)}")
        if options.int8_preset not in PRESETS:
            raise ValueError(f"--int8-preset {options.int8_preset}: expected one of {', '.join(PRESETS)}")
        if options.openvino_int8 == "qdq" and "onnx" not in requested:
            raise ValueError("--openvino-int8 qdq converts the INT8 ONNX file; add onnx to --include (or use "
                             "the default nncf)")

    def quantize(self, float_result: ExportResult, target: Path, job: Int8Job) -> ExportResult:
        method = job.options.openvino_int8
        EXPORT_LOG.info(f"openvino_int8: {OPENVINO_INT8_HOW[method]} (--openvino-int8 {method}"
                    f"{', the default' if method == DEFAULT_OPENVINO_INT8 else ''})")
        if method == "qdq":
            if "onnx_int8" not in job.done:  # refused by its own gate (--int8 without --include goes on)
                raise ExportError(f"openvino_int8 export of {target.name} failed: --openvino-int8 qdq "
                                  "converts the INT8 ONNX file, and none was accepted")
            return export_openvino_qdq(job.done["onnx_int8"], target, job)
        return export_openvino_nncf(float_result.path, target, job)

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
