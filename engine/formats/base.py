"""The interface every export format implements: a Format (file name, metadata, writer, runner,
capabilities) and the Runner it builds. See engine/formats/__init__.py for the registry."""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

LOGGER = logging.getLogger("vitdet.engine.backend")  # runners log as the inference backend always did


@dataclass(frozen=True)
class Capabilities:
    """What a format can do.

    dynamic: can be exported with any batch and input size (--dynamic); bf16: runs in bfloat16
    (bf16_native_only: only on CPUs with native bf16, no emulation); int8: export.py --int8 writes an
    INT8 model in this format; batch: runs batches > 1 (fixed-shape files in chunks of their batch);
    augment: YOLOv5's test-time augmentation; ensemble: several files run as one model; exportable:
    export.py writes it (a checkpoint is the source, not an export); lazy_init: the first call pays
    for initialisation, so a warm-up call is worth it on the CPU; torch_threads: inference runs on
    torch's own CPU thread pool (else torch only converts tensors and runs NMS around another runtime's
    threads, and detect.py gives it one thread: see engine.predictor).
    """

    dynamic: bool = True
    bf16: bool = False
    bf16_native_only: bool = False
    int8: bool = False
    batch: bool = True
    augment: bool = False
    ensemble: bool = False
    exportable: bool = True
    lazy_init: bool = True
    torch_threads: bool = False


@dataclass(frozen=True)
class RunOptions:
    """How InferenceBackend asks a format to run a file: fp16 (CUDA), fuse (Conv+BN folding of a
    checkpoint), bf16 (see InferenceBackend)."""

    fp16: bool = False
    fuse: bool = True
    bf16: bool = False


@dataclass(frozen=True)
class WriteOptions:
    """What a writer needs besides the model, the sample input and the metadata."""

    opset: int
    dynamic: bool
    simplify: bool
    stem: str  # the weights' stem: names the files inside a folder export (<stem>.xml)


@runtime_checkable
class Runner(Protocol):
    """One loaded model of one format: (B, 3, H, W) float RGB in [0, 1] -> (B, N, 5 + nc) decoded rows.

    stride: largest stride (px); names: class names; dynamic: any input size and batch; fixed_shape:
    (B, H, W) of a static export, else None; fp16: runs in float16; input_dtype: the dtype it takes;
    precision: 'fp32', 'fp16', 'bf16' or 'int8'; model: the underlying model, session or compiled model.
    """

    stride: int
    names: list[str]
    dynamic: bool
    fixed_shape: tuple[int, int, int] | None
    fp16: bool
    input_dtype: torch.dtype
    precision: str
    model: Any

    def __call__(self, im: torch.Tensor) -> torch.Tensor: ...


class Format(ABC):
    """One export format: its name, where it is written, its metadata, how it is written and run."""

    name: str  # 'onnx'
    suffix: str  # the file suffix ('.onnx') or, for a folder format, the folder name's ending
    is_dir: bool = False
    capabilities: Capabilities = Capabilities()
    tolerance: float = 1e-3  # largest relative output difference from the checkpoint (exporter.compare)

    def target(self, weights: Path, int8: bool = False) -> Path:
        """Where this format is written for `weights` (best.pt -> best.onnx / best_int8.onnx)."""
        return weights.with_name(f"{weights.stem}{'_int8' if int8 else ''}{self.suffix}")

    def matches(self, path: Path) -> bool:
        """True when `path` (file or folder) is in this format, judged by its name."""
        return path.suffix == self.suffix

    def exists(self, path: Path) -> bool:
        return path.is_dir() if self.is_dir else path.is_file()

    @abstractmethod
    def read_metadata(self, path: Path) -> dict[str, Any]:
        """The export's metadata ({} when it has none)."""

    def write(self, model: torch.nn.Module, sample: torch.Tensor, tmp: Path, meta: dict[str, Any],
              options: WriteOptions) -> None:
        """Write `model` (traced on `sample`) with `meta` to the temporary path `tmp`."""
        raise NotImplementedError(f"{self.name} is not written by export.py")

    @abstractmethod
    def runner(self, path: Path, device: torch.device, options: RunOptions) -> Runner:
        """Load `path` for inference."""

    # -- export.py hooks (optional) ---------------------------------------------------------------
    def check_request(self, options: Any, requested: Sequence[str]) -> None:  # noqa: B027 (optional hook)
        """Refuse (ValueError) an export request this format cannot serve: a missing package, a flag
        it cannot honour. `options`: engine.exporter.ExportOptions; `requested`: the --include names."""

    def check_int8_request(self, options: Any, requested: Sequence[str]) -> None:  # noqa: B027
        """As check_request, for this format's own --int8 flags (only called with --int8)."""

    def quantize(self, float_result: Any, target: Path, job: Any) -> Any:
        """Write this format's INT8 model of the verified float export `float_result` (an
        engine.formats.int8.ExportResult) to `target`, accepted only through `job.gate`-style accuracy
        checks; returns its ExportResult. Only formats with `capabilities.int8` implement it."""
        raise NotImplementedError(f"{self.name} has no INT8 export")


# -- metadata helpers shared by the formats ------------------------------------------------------------
def decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    """ONNX-style string metadata values are JSON; a value that is not JSON is kept as text."""
    decoded = {}
    for key, value in props.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def names_from_metadata(meta: dict[str, Any], nc: int | None, path: Path) -> list[str]:
    names = meta.get("names")
    if isinstance(names, dict):  # {id: name}, as some YOLOv5 exports write it
        names = [names[k] for k in sorted(names, key=int)]
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    count = nc if nc is not None else 0
    LOGGER.warning(f"{path}: no class names in the file's metadata; using '0'..'{max(count - 1, 0)}'")
    return [str(i) for i in range(count)]


def stride_from_metadata(meta: dict[str, Any], path: Path) -> int:
    stride = meta.get("stride")
    if isinstance(stride, (list, tuple)):
        stride = max(stride)
    if isinstance(stride, (int, float)) and stride >= 1:
        return int(stride)
    LOGGER.warning(f"{path}: no stride in the file's metadata; assuming 32")
    return 32


def fixed_shape_from_metadata(meta: dict[str, Any], path: Path) -> tuple[int, int, int] | None:
    shape = meta.get("shape")  # [B, 3, H, W] of the export
    if isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) for s in shape):
        return shape[0], shape[2], shape[3]
    LOGGER.warning(f"{path}: no input shape in the metadata; any input size will be tried")
    return None


def precision_of(meta: dict[str, Any], fp16: bool) -> str:
    """The precision an export's metadata states, else fp16/fp32 from how it runs."""
    value = meta.get("precision")
    return str(value) if value else ("fp16" if fp16 else "fp32")
