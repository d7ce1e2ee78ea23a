"""benchmarks.py --files: the latency of existing model files side by side, in one process.

Any file InferenceBackend runs can be compared -- our checkpoints and exports, and other projects'
exports with the same output layout (YOLOv5's ONNX and OpenVINO exports: (B, N, 5 + nc) decoded rows):

    python benchmarks.py --files ours=best_int8_openvino_model yolov5=yolov5s_int8_openvino_model --runs 50

Every file runs through the runner detect.py and val.py use. The files are timed in alternating
rounds (one call of each per round), so that a change in the machine's load during the run hits every
file alike; each file's median is reported with its ratio to the first file's.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def parse_file_args(items: list[str]) -> dict[str, Path]:
    """`label=path` pairs (a bare path is labelled by its name); ValueError naming a bad item."""
    files: dict[str, Path] = {}
    for item in items:
        label, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(path)
        label = label or path.name
        if not path.exists():
            raise FileNotFoundError(f"--files {item}: {path} does not exist")
        if label in files:
            raise ValueError(f"--files {item}: the label {label} is given twice")
        files[label] = path
    if not files:
        raise ValueError("--files: give at least one label=path")
    return files


def file_input(backend, imgsz: int) -> torch.Tensor:
    """A batch-1 input the file accepts: its fixed shape, else imgsz x imgsz."""
    shape = getattr(backend, "fixed_shape", None)
    height, width = (shape[1], shape[2]) if shape else (imgsz, imgsz)
    return torch.rand(1, 3, height, width)


def alternating_latency(files: Mapping[str, Path], imgsz: int, runs: int, warmup: int) -> list[dict]:
    """One row per file: label, path, precision, input (HxW), median_ms, ratio (to the first file)."""
    from engine.backend import InferenceBackend

    backends = {label: InferenceBackend(path, device="cpu") for label, path in files.items()}
    inputs = {label: file_input(backend, imgsz) for label, backend in backends.items()}
    times: dict[str, list[float]] = {label: [] for label in backends}
    with torch.inference_mode():
        for label, backend in backends.items():
            for _ in range(warmup):
                backend(inputs[label])
        for _ in range(runs):
            for label, backend in backends.items():
                start = time.perf_counter()
                backend(inputs[label])
                times[label].append((time.perf_counter() - start) * 1e3)
    first = statistics.median(next(iter(times.values())))
    rows = []
    for label, backend in backends.items():
        median = statistics.median(times[label])
        x = inputs[label]
        rows.append({"file": label, "path": str(files[label]), "precision": backend.precision,
                     "input": f"{x.shape[2]}x{x.shape[3]}", "median_ms": median, "ratio": median / first})
    return rows


def latency_table(rows: list[dict], runs: int) -> str:
    header = f"| file | precision | input | median ms ({runs} alternating rounds) | ratio to {rows[0]['file']} |"
    lines = [header, "|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['precision']} | {r['input']} | {r['median_ms']:.1f} | {r['ratio']:.2f} |"
              for r in rows]
    return "\n".join(lines)
