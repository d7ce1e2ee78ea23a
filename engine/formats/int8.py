"""What every format's INT8 writer (`Format.quantize`) shares: the calibration data, the accuracy gate
and the export results it returns. The writers themselves live in their format's module (ONNX Runtime
QDQ in engine/formats/onnx.py, NNCF and QDQ-converted IRs in engine/formats/openvino.py); the exporter
only walks `formats.int8_formats()` and calls each one's `quantize` with an `Int8Job`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("vitdet.engine.exporter")


class ExportError(RuntimeError):
    """An export that could not be written or that gives different numbers from the PyTorch model."""


class Int8GateError(ExportError):
    """An INT8 model written fine whose val mAP50-95 dropped by more than the tolerance."""


@dataclass
class Verification:
    """One comparison of an export with the PyTorch model on the same input."""

    input_shape: tuple[int, ...]
    max_abs_diff: float
    relative_diff: float  # see engine.exporter.compare_outputs


@dataclass
class ExportResult:
    path: Path
    checks: list[Verification] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # INT8: map_float, map_int8, drop, ops, method


@dataclass
class Calibration:
    """An INT8 request's data: letterboxed calibration batches and how the gate validates."""

    data: Any
    batches: list
    images: int
    imgsz: int  # val --imgsz (the export's longer side; a static export dictates its own shape)
    batch: int
    workers: int
    tolerance: float
    shape: tuple[int, ...] = ()  # the export's (B, 3, H, W)
    stride: int = 32

    @classmethod
    def load(cls, data: Any, calib: int | None, tolerance: float | None, workers: int,
             shape: Sequence[int], stride: int) -> Calibration:
        from engine import quantize

        files = quantize.calibration_files(data, calib or quantize.DEFAULT_CALIB_IMAGES)
        LOGGER.info(f"INT8: calibrating on {len(files)} images of the train split of {data}, "
                    f"letterboxed to {shape[2]}x{shape[3]}")
        tolerance = quantize.DEFAULT_INT8_TOLERANCE if tolerance is None else tolerance
        return cls(data, quantize.calibration_batches(files, shape, stride), len(files),
                   max(shape[2], shape[3]), shape[0], workers, tolerance, tuple(shape), stride)

    def val_batches(self, count: int) -> list:
        """`count` val images letterboxed to the export's shape, as model inputs (NNCF ranks layers on them)."""
        from engine import quantize

        return quantize.calibration_batches(quantize.calibration_files(self.data, count, split="val"),
                                            self.shape, self.stride)

    @property
    def data_name(self) -> str:
        return Path(str(self.data)).name

    def val_map(self, weights: Path, backend=None) -> float:
        """The gate's metric: val mAP50-95 of `weights` (or of `backend`, carrying that file's metadata)."""
        from engine import quantize

        return quantize.val_map(weights, self.data, self.imgsz, self.batch, self.workers, backend=backend)


@dataclass
class Int8Job:
    """Everything a format's `quantize(float_result, target, job)` needs.

    options: the ExportOptions (each format reads its own INT8 flags); head_prefix: the Detect layer's
    node-name prefix in the exported graph (its decode stays float); stem: the weights' stem;
    output_checks(label, path): runs an INT8 file on the verification inputs and logs its distance from
    PyTorch (INT8 is judged by mAP, not by that distance); done: the INT8 results written so far, by
    '<format>_int8', in registry order (the OpenVINO QDQ flavour converts the accepted ONNX file).
    """

    options: Any
    calibration: Calibration
    head_prefix: str
    stem: str
    output_checks: Callable[[str, Path], list[Verification]]
    done: dict[str, ExportResult] = field(default_factory=dict)

    def gate(self, label: str, target: Path, map_float: float, map_int8: float) -> float:
        """The mAP50-95 drop of an INT8 model, or Int8GateError naming both mAPs and the tolerance."""
        from engine import quantize

        try:
            return quantize.check_int8_accuracy(map_float, map_int8, self.calibration.tolerance)
        except ValueError as err:
            raise Int8GateError(f"{label} export of {target.name} failed: {err}") from err


def size_mb(path: Path) -> float:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6
