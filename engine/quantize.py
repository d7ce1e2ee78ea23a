"""Static INT8 quantisation of an ONNX export with onnxruntime.quantization (export.py --int8).

    from engine.quantize import quantize_onnx_int8
    quantize_onnx_int8("best.onnx", "best_int8.onnx", calibration_batches(...), head_prefix="/model.24/")

Settings and why:
- QDQ format (QuantizeLinear/DequantizeLinear pairs around the quantised ops): a plain ONNX file that
  any runtime loads; onnxruntime fuses each DQ -> op -> Q into its integer kernels at load time.
- U8S8: activations QUInt8 (asymmetric, MinMax-calibrated), weights QInt8 symmetric per output channel.
  `reduce_range` (7-bit weights) only where the exporting CPU lacks VNNI: without VNNI onnxruntime's
  u8 x s8 kernels (vpmaddubsw) sum pairs in 16 bits, which full 8-bit weights can saturate; with VNNI
  (AVX-512 VNNI / AVX-VNNI) the sums are 32-bit and the 8th bit is free accuracy. The choice is in the
  file's metadata (`int8.reduce_range`); InferenceBackend warns when a full-range file runs on a CPU
  without VNNI.
- Which ops (`ops`): 'full' quantises the convolutions and linear layers *and* the ops between them
  (SiLU's Sigmoid and Mul, residual Adds, Concat, MaxPool, Resize, pooling, ReLU/Clip), so consecutive
  layers pass int8 tensors and the graph runs in integer kernels end to end -- faster than 'conv',
  which quantises only Conv / MatMul / Gemm and pays a float SiLU plus a Quantize/Dequantize round trip
  around every conv. Softmax, normalisations, divisions and the shape
  ops stay float32 in both. export.py's default 'auto' writes 'full' and falls back to 'conv' when
  'full' fails the accuracy gate.
- Kept in float32 as well (nodes_to_exclude): every node of the Detect head (its output 1x1 convs give
  the objectness/class logits and box offsets, where 8-bit steps cost mAP directly, and the box
  decoding multiplies by grid positions and anchors), and every MatMul that multiplies two activations
  (attention scores q @ k^T and attention @ v: softmax outputs are skewed towards 0 and a per-tensor
  8-bit scale loses the small weights). MatMuls with a constant weight (linear layers) are quantised.
- onnxruntime's quant_pre_process (shape inference + graph optimisation) runs first, as onnxruntime
  recommends; if it fails on a graph the float file is quantised as it is (with a warning).

Calibration images come from the dataset's train split, letterboxed exactly as detect.py feeds a
fixed-shape export (`letterbox(..., auto=False)` to the export's height x width, RGB, /255).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger(f"vitdet.{__name__}")

DEFAULT_CALIB_IMAGES = 100
DEFAULT_INT8_TOLERANCE = 0.01  # largest allowed mAP50-95 drop (absolute) of the INT8 model
OP_TYPES = {  # ops quantised by each `ops` choice (see the module docstring)
    "conv": ("Conv", "MatMul", "Gemm"),
    "full": ("Conv", "MatMul", "Gemm", "Add", "Mul", "Sigmoid", "Concat", "MaxPool", "Resize", "AveragePool",
             "GlobalAveragePool", "Relu", "Clip"),
}


def int8_settings(ops: str, reduce_range: bool) -> dict[str, Any]:
    """The quantisation settings, as recorded in the INT8 file's metadata (`int8`)."""
    return {"format": "QDQ", "activations": "QUInt8", "weights": "QInt8 per-channel",
            "reduce_range": reduce_range, "calibration": "MinMax", "ops": ops,
            "op_types": list(OP_TYPES[ops])}


def int8_target(weights: Path) -> Path:
    """best.pt -> best_int8.onnx (next to the weights)."""
    return weights.with_name(f"{weights.stem}_int8.onnx")


# -- calibration data ---------------------------------------------------------------------------------
def calibration_files(data: str | Path | dict, count: int, split: str = "train") -> list[str]:
    """`count` images spread evenly over the dataset's `split` (all of them when it is smaller)."""
    from data.config import check_dataset
    from data.verify import list_image_files

    if count < 1:
        raise ValueError(f"--calib {count}: need at least one calibration image")
    cfg = check_dataset(data)
    files, _ = list_image_files(cfg[split])
    if not files:
        raise ValueError(f"dataset {cfg.get('yaml_file')}: no images in the {split} split to calibrate on")
    if len(files) <= count:
        return files
    index = np.linspace(0, len(files) - 1, count).round().astype(int)
    return [files[i] for i in index]


def letterboxed(file: str, height: int, width: int, stride: int) -> np.ndarray | None:
    """One image as a fixed-shape export receives it: (3, H, W) float32 RGB in [0, 1]; None if unreadable."""
    import cv2

    from data.augment import letterbox

    im0 = cv2.imread(file)
    if im0 is None:
        LOGGER.warning(f"calibration: {file} cannot be decoded, skipped")
        return None
    im = letterbox(im0, (height, width), stride=stride, auto=False)[0]
    im = np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
    return im.astype(np.float32) / 255.0


def calibration_batches(files: Sequence[str], shape: Sequence[int], stride: int) -> list[np.ndarray]:
    """Letterboxed images stacked into (B, 3, H, W) batches of the export's batch size B (the last
    batch is filled up with the first images)."""
    b, _, h, w = shape
    images = [im for im in (letterboxed(f, h, w, stride) for f in files) if im is not None]
    if not images:
        raise ValueError("calibration: none of the images could be read")
    images += images[: (-len(images)) % b]  # fill the last batch (a batch larger than the images: repeat)
    while len(images) % b:
        images += images[: (-len(images)) % b]
    return [np.stack(images[i:i + b]) for i in range(0, len(images), b)]


class _BatchReader:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name, self.batches = input_name, list(batches)
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iter = iter(self.batches)


# -- which nodes stay float ---------------------------------------------------------------------------
def float_nodes(model_onnx, head_prefix: str) -> list[str]:
    """Names of the nodes to keep in float32: every node under `head_prefix` (the Detect head, e.g.
    '/model.24/') and MatMuls of two activations (attention)."""
    constants = {init.name for init in model_onnx.graph.initializer}
    constants |= {out for node in model_onnx.graph.node if node.op_type == "Constant" for out in node.output}
    keep = []
    for node in model_onnx.graph.node:
        if node.name.startswith(head_prefix):
            keep.append(node.name)
        elif node.op_type == "MatMul" and not any(i in constants for i in node.input):
            keep.append(node.name)
    return keep


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


# -- quantisation -------------------------------------------------------------------------------------
def _pre_process(source: Path, target: Path) -> Path:
    """onnxruntime's quant_pre_process, with symbolic shape inference when it completes (it does not on
    some dynamic-shape graphs: then ONNX's own shape inference only), else the file as it is."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = source.resolve(), target.resolve()
    error = None
    for skip_symbolic in (False, True):
        # an incomplete symbolic inference saves 'sym_shape_infer_temp.onnx' (+ data) into the working
        # directory: run it from the target's (temporary) folder so the user's folder stays clean
        with contextlib.chdir(target.parent):
            try:
                quant_pre_process(str(source), str(target), skip_symbolic_shape=skip_symbolic)
                return target
            except Exception as err:  # an op or shape the inference does not know
                error = err
    LOGGER.warning(f"INT8: onnxruntime's quant_pre_process failed ({type(error).__name__}: {error}); "
                   f"quantising the export without it")
    return source


def quantize_onnx_int8(float_onnx: str | Path, out: str | Path, batches: Sequence[np.ndarray],
                       head_prefix: str, metadata: dict[str, Any] | None = None, ops: str = "full",
                       reduce_range: bool | None = None) -> list[str]:
    """Write the static INT8 (QDQ) quantisation of `float_onnx` to `out`, calibrated on `batches`.

    ops: 'full' or 'conv' (see the module docstring); reduce_range: 7-bit weights (default: only where
    this CPU lacks VNNI). The float file's metadata_props are carried over, as JSON values like every
    export's, with `metadata` added and `precision: int8` and `int8` (the settings, plus any keys of
    metadata['int8']) set. Returns the names of the nodes kept in float32.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from engine.precision import cpu_has_vnni

    if ops not in OP_TYPES:
        raise ValueError(f"INT8 ops '{ops}': expected one of {', '.join(OP_TYPES)}")
    reduce_range = not cpu_has_vnni() if reduce_range is None else reduce_range
    float_model = onnx.load(str(float_onnx))
    input_name = float_model.graph.input[0].name
    meta = {p.key: p.value for p in float_model.metadata_props}
    extra = dict(metadata or {})
    extra["precision"] = "int8"
    extra["int8"] = {**int8_settings(ops, reduce_range), **extra.get("int8", {})}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    with tempfile.TemporaryDirectory(prefix="vitdet-int8-") as tmp:
        source = _pre_process(Path(float_onnx), Path(tmp) / "pre.onnx")
        excluded = float_nodes(onnx.load(str(source)), head_prefix)
        reader = _BatchReader(input_name, batches)
        with _quiet_root_logger():  # onnxruntime.quantization logs one root INFO line per shared bias
            quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=reduce_range, op_types_to_quantize=list(OP_TYPES[ops]),
                            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax)
    model = onnx.load(str(out))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    LOGGER.info(f"INT8: quantised {Path(float_onnx).name} ({ops}: {', '.join(OP_TYPES[ops])}; "
                f"{'7' if reduce_range else '8'}-bit weights) on {sum(len(b) for b in batches)} calibration "
                f"images; {len(excluded)} nodes kept in float32")
    return excluded


# -- the accuracy gate --------------------------------------------------------------------------------
def val_map(weights: Path, data, imgsz: int, batch_size: int, workers: int = 0, bf16: bool = False,
            backend=None) -> float:
    """mAP50-95 of `weights` (or of `backend`, an InferenceBackend in memory) on the dataset's val split
    (engine.evaluation, no plots, temp folder), under bf16 autocast with `bf16`."""
    from engine.evaluation import EvalOptions, evaluate

    with tempfile.TemporaryDirectory(prefix="vitdet-val-") as tmp:
        results, _ = evaluate(EvalOptions(weights=weights, data=str(data) if isinstance(data, Path) else data,
                                          imgsz=imgsz, batch_size=batch_size, device="cpu", workers=workers,
                                          plots=False, project=tmp, name="val", exist_ok=True, bf16=bf16,
                                          report_folder=False), backend)
    return float(results.map)


def check_int8_accuracy(float_map: float, int8_map: float, tolerance: float) -> float:
    """The mAP50-95 drop (float - INT8); ValueError naming it when it exceeds `tolerance`."""
    drop = float_map - int8_map
    LOGGER.info(f"INT8 accuracy on the val split: mAP50-95 float {float_map:.4f}, INT8 {int8_map:.4f}, "
                f"drop {drop:+.4f} (tolerance {tolerance:g})")
    if drop > tolerance:
        raise ValueError(f"INT8 mAP50-95 {int8_map:.4f} vs float {float_map:.4f}: drop {drop:.4f} > "
                         f"--int8-tolerance {tolerance:g}; the INT8 model was not written (calibrate on more "
                         f"images with --calib, or raise --int8-tolerance)")
    return drop
