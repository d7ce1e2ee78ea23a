"""Export formats as a registry: one module per format, each a `Format` (engine.formats.base) that
declares its file or folder name, how it is written, how its metadata is read, the Runner that runs
it and its Capabilities. InferenceBackend, the exporter, the Detector and benchmarks.py iterate this
registry; adding a runtime means adding one module here and one line to FORMATS.

    from engine import formats
    fmt = formats.format_of(Path("best_openvino_model"))   # the OpenVINO Format
    fmt.target(Path("best.pt"), int8=True)                # best_int8_openvino_model
    runner = fmt.runner(path, torch.device("cpu"), formats.RunOptions())
"""

from __future__ import annotations

from pathlib import Path

from engine.formats import onnx, openvino, pytorch, torchscript
from engine.formats.base import Capabilities, Format, Runner, RunOptions, WriteOptions

FORMATS: dict[str, Format] = {f.name: f for f in (pytorch.FORMAT, torchscript.FORMAT, onnx.FORMAT,
                                                  openvino.FORMAT)}

__all__ = ["FORMATS", "Capabilities", "Format", "RunOptions", "Runner", "WriteOptions", "exportable",
           "format_of", "get", "int8_formats"]


def get(name: str) -> Format:
    """The Format called `name`; ValueError listing the known ones."""
    if name not in FORMATS:
        raise ValueError(f"unknown format '{name}'; expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(path: Path) -> Format | None:
    """The Format of a file or folder by its name (None when no format claims it)."""
    for fmt in FORMATS.values():
        if fmt.matches(Path(path)):
            return fmt
    return None


def exportable() -> tuple[str, ...]:
    """The names export.py --include accepts, in registry order."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.capabilities.exportable)


def int8_formats() -> tuple[str, ...]:
    """The formats export.py --int8 writes an INT8 model in."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.capabilities.int8)
