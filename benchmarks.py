"""Speed and size of every model YAML, each also as a ratio to yolov5s measured in the same run.

    python benchmarks.py                                  # all configs/models/*.yaml, 640 px, CPU
    python benchmarks.py --cfg yolov5n.yaml yolov5-fastvit.yaml --onnx --train-step
    python benchmarks.py --cfg yolov5n.yaml --loader bccd.yaml   # + data-loader images/s (mosaic on)
    python benchmarks.py --cfg yolov5n.yaml --bf16 --onnx --int8 --openvino   # every runtime/precision
    python benchmarks.py --cfg yolov5n.yaml --map-data bccd.yaml --map-weights best.pt   # + mAP per precision
    python benchmarks.py --files ours=best_int8_openvino_model yolov5=y5_int8_openvino_model --runs 50

Columns: parameters, GFLOPs at --imgsz (batch 1, torch.utils.flop_counter), median CPU latency at
batch 1 after warm-up for the model as built (eager) and, through InferenceBackend -- the same runners,
session settings and thread defaults as detect.py and val.py -- for the fused checkpoint and, opt-in,
each runtime and precision of the project's own exports (engine.exporter, static batch 1 at --imgsz):
eager bf16 (`--bf16`: torch.autocast bf16, Detect head float32; only where the CPU has native bf16, else
'n/a (no native bf16)'), ONNX Runtime float32 (`--onnx`), ONNX Runtime INT8 (`--int8`: the static QDQ
quantisation of export.py --int8 with its default ops 'full', calibrated here on 4 random images --
right for latency, not for accuracy), OpenVINO float32 (`--openvino`, CPU device, precision set to
f32), OpenVINO bf16 (`--openvino --bf16`), OpenVINO running the INT8 QDQ file (`--openvino --int8`,
`openvino_int8_ms`) and NNCF's INT8 IR (`--openvino --int8`, `openvino_nncf_ms`: export.py's default
INT8 IR, engine.quantize_openvino).
Each latency column `<x>_ms` comes with `<x>_gflops_s`, the effective throughput GFLOPs / latency
(INT8 counts the same nominal FLOPs). Also opt-in: detect.py frames/s end to end (model start-up
included) on a generated 640x480 video of --detect-frames frames (300) with the .pt and, with
--onnx / --int8 / --openvino, with dynamic-shape exports (letterboxed to 640x480 like the .pt) plus an
INT8 file exported for exactly 480x640 (`detect_int8_fixed_fps`) and, with --int8 --openvino, NNCF's INT8
IR (`detect_nncf_fps`); the time of one training step
(forward + backward of a stand-in loss at --train-batch) and peak training memory. A measurement that
fails is logged and its cell says `failed (<error>)`; the other columns are still measured, and the CSV
is rewritten after every model. Under the table: this machine's measured float32 sgemm throughput
(torch.mm 2048x2048, 1 and 2 threads) to compare the GFLOP/s with, and with --map-data/--map-weights
the val mAP50-95 of a trained checkpoint in each precision (eager fp32, bf16 -- emulated and labelled so
where the CPU lacks native bf16 --, ORT fp32, ORT INT8 calibrated on the dataset's train split,
OpenVINO fp32, OpenVINO INT8 (NNCF, export.py's default INT8 IR, calibrated on the train split) and
OpenVINO bf16 where native).

Figures from one machine at one moment vary; the ratios to yolov5s (measured in the same run) are what
to compare. Writes a markdown table (stdout and --out .md) and a CSV (--out .csv).
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.backbones.plugins import load_plugins
from models.yolo import DetectionModel
from utils.allocator import keep_freed_memory
from utils.general import CONFIGS, resolve_config
from utils.torch_utils import count_flops, count_parameters

LOGGER = logging.getLogger(f"vitdet.{__name__}")
REFERENCE = "yolov5s.yaml"


def median_latency_ms(fn, runs: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_latency(model: torch.nn.Module, imgsz: int, runs: int, warmup: int) -> float:
    x = torch.rand(1, 3, imgsz, imgsz)
    with torch.inference_mode():
        return median_latency_ms(lambda: model(x), runs, warmup)


def backend_latency(path: Path, imgsz: int, runs: int, warmup: int, bf16: bool = False,
                    fuse: bool = True) -> float:
    """Latency at batch 1 of a weights file run exactly as detect.py and val.py run it (InferenceBackend:
    the format's own runner, its session settings and thread defaults)."""
    from engine.backend import InferenceBackend

    backend = InferenceBackend(path, device="cpu", bf16=bf16, fuse=fuse)
    x = torch.rand(1, 3, imgsz, imgsz)
    with torch.inference_mode():
        return median_latency_ms(lambda: backend(x), runs, warmup)


def runtime_files(weights: Path, imgsz: int | tuple[int, int], runtimes: Sequence[str], dynamic: bool = False,
                  int8: bool = False) -> dict[str, Path | str]:
    """{column: file} of the exports a benchmark times, all written by the project's own exporter and
    quantisers next to `weights`: one float export per format in `runtimes` (registry names) and, with
    `int8`, the INT8 model of each INT8-capable format (`<format>_int8`: ONNX Runtime QDQ, and for
    OpenVINO the QDQ file converted, as 'openvino_int8', and NNCF's quantisation of the float IR, as
    'openvino_nncf'), calibrated on 4 random images (speed does not depend on calibration). A file
    that cannot be made is a failed(...) text."""
    from engine import formats
    from engine.exporter import export_and_verify

    files: dict[str, Path | str] = {}
    float_formats = [f for f in formats.exportable() if f in runtimes or (int8 and f == "onnx")]
    for fmt in float_formats:
        files[fmt] = _guarded(f"{fmt} export", lambda fmt=fmt: export_and_verify(
            weights, include=(fmt,), imgsz=imgsz, dynamic=dynamic)[fmt].path)
    if int8:
        shape = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
        head_prefix = _head_prefix(weights)
        files["onnx_int8"] = _guarded("INT8 (QDQ) file",
                                      lambda: _int8_file(files["onnx"], head_prefix, shape))
        if "openvino" in runtimes:
            files["openvino_int8"] = _guarded("INT8 QDQ file in OpenVINO",
                                              lambda: _qdq_ir(files["onnx_int8"]))
            files["openvino_nncf"] = _guarded("NNCF INT8 IR", lambda: _nncf_ir(files["openvino"], head_prefix,
                                                                                shape))
    return {k: v for k, v in files.items() if k in runtimes or k.endswith(("_int8", "_nncf"))}


def _head_prefix(weights: Path) -> str:
    """The Detect head's node-name prefix in the exported graph ('/model.<last layer>/'), kept float."""
    from engine.checkpoint import load_detection_model

    return f"/model.{len(load_detection_model(weights, torch.device('cpu'), fuse=False).model) - 1}/"


def _qdq_ir(int8_file: Path | str) -> Path:
    """The QDQ ONNX file converted to an OpenVINO IR folder beside it (export.py --openvino-int8 qdq)."""
    from engine.formats.onnx import read_onnx_metadata
    from engine.formats.openvino import write_openvino_from_onnx

    if isinstance(int8_file, str):
        raise RuntimeError(f"no INT8 ONNX file to convert ({int8_file})")
    folder = int8_file.with_name(f"{int8_file.stem}_qdq_openvino_model")
    folder.mkdir(exist_ok=True)
    write_openvino_from_onnx(int8_file, folder, read_onnx_metadata(int8_file), int8_file.stem)
    return folder


def _nncf_ir(float_ir: Path | str, head_prefix: str, shape: tuple[int, int]) -> Path:
    """NNCF's INT8 quantisation of the float IR (export.py --openvino-int8 nncf's settings), on 4 random
    images, in a folder beside it."""
    from engine.formats.openvino import openvino_model_files, read_openvino_metadata, write_openvino_metadata
    from engine.quantize_openvino import quantize_openvino_ir

    if isinstance(float_ir, str):
        raise RuntimeError(f"no float OpenVINO IR to quantise ({float_ir})")
    rng = np.random.default_rng(0)
    batches = [rng.random((1, 3, *shape), dtype=np.float32) for _ in range(4)]
    xml, _ = openvino_model_files(float_ir)
    folder = float_ir.with_name(f"{xml.stem}_nncf_openvino_model")
    folder.mkdir(exist_ok=True)
    settings = quantize_openvino_ir(xml, folder / f"{xml.stem}_int8.xml", batches, head_prefix)
    meta = {**read_openvino_metadata(float_ir), "precision": "int8", "int8": settings}
    write_openvino_metadata(folder, meta)
    return folder


def sgemm_gflops(threads: int, size: int = 2048, runs: int = 3) -> float:
    """Measured float32 matrix-multiply throughput (torch.mm of two size x size matrices), GFLOP/s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.rand(size, size), torch.rand(size, size)
        ms = median_latency_ms(lambda: torch.mm(a, b), runs, warmup=1)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / (ms / 1e3) / 1e9


def train_step_ms(cfg: str, imgsz: int, batch: int, runs: int) -> float:
    """Median time of one forward+backward+SGD step in train mode (sum of outputs as a stand-in loss)."""
    model = DetectionModel(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, imgsz, imgsz)

    def step():
        optimizer.zero_grad()
        sum(o.float().mean() for o in model(x)).backward()
        optimizer.step()

    return median_latency_ms(step, runs, warmup=1)


def _clip(path: Path, frames: int) -> Path:
    """A generated 640x480 mp4 of `frames` random frames (30 fps)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    writer.release()
    return path


def failed(what: str, err: Exception) -> str:
    """The cell text of a measurement that failed (logged): the run goes on with the other columns."""
    LOGGER.warning(f"{what} failed: {type(err).__name__}: {err}")
    return f"failed ({type(err).__name__})"


def _guarded(what: str, fn):
    """fn() or, when it raises, a failed(...) text for its cell."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 -- one failing runtime must not end a long benchmark run
        return failed(what, err)


def detect_files(weights: Path, head_prefix: str, runtimes: Sequence[str]) -> dict[str, Path | str]:
    """{runtime: model file} for detect.py: the .pt itself and, per requested runtime, its dynamic-shape
    export (so detect.py letterboxes 640x480 frames to 640x480, as it does for the .pt); with 'int8' also
    'int8_fixed', an INT8 file exported for exactly 480x640 (fixed shapes let onnxruntime plan ahead:
    what to deploy for a camera of known size). INT8 models are quantised from the float export on 4
    random images (speed does not depend on calibration). An export that fails is a failed(...) text."""
    from engine.exporter import export_and_verify

    files: dict[str, Path | str] = {"pt": weights}
    for fmt in ("onnx", "openvino"):
        if fmt in runtimes or (fmt == "onnx" and "int8" in runtimes):
            files[fmt] = _guarded(f"dynamic {fmt} export for detect.py", lambda fmt=fmt: export_and_verify(
                weights, include=(fmt,), imgsz=640, dynamic=True)[fmt].path)
    if "int8" in runtimes:
        fixed = Path(shutil.copy(weights, weights.with_name(f"{weights.stem}_fixed.pt")))
        files["int8"] = _guarded("INT8 file for detect.py",
                                 lambda: _int8_file(files["onnx"], head_prefix, (480, 640)))
        fixed_onnx = _guarded("fixed-shape ONNX export for detect.py", lambda: export_and_verify(
            fixed, include=("onnx",), imgsz=(480, 640))["onnx"].path)
        files["int8_fixed"] = _guarded("fixed-shape INT8 file for detect.py",
                                       lambda: _int8_file(fixed_onnx, head_prefix, (480, 640)))
        if "openvino" in runtimes:  # NNCF's INT8 IR of the dynamic float IR (export.py's default INT8 IR)
            files["nncf"] = _guarded("NNCF INT8 IR for detect.py",
                                     lambda: _nncf_ir(files["openvino"], head_prefix, (480, 640)))
    if "onnx" not in runtimes:
        files.pop("onnx", None)
    return files


def _int8_file(float_file: Path | str, head_prefix: str, shape: tuple[int, int]) -> Path:
    """`<stem>_int8.onnx` beside `float_file`, quantised on 4 random (1, 3, *shape) images; `float_file`
    may be the failed(...) text of its export, which is passed on as an error."""
    from engine.quantize import quantize_onnx_int8

    if isinstance(float_file, str):
        raise RuntimeError(f"no float ONNX file to quantise ({float_file})")

    rng = np.random.default_rng(0)
    batches = [rng.random((1, 3, *shape), dtype=np.float32) for _ in range(4)]
    target = float_file.with_name(f"{float_file.stem}_int8.onnx")
    quantize_onnx_int8(float_file, target, batches, head_prefix)
    return target


def detect_fps(model: DetectionModel, frames: int = 300,
               runtimes: Sequence[str] = ()) -> dict[str, float | str]:
    """detect.py end to end (read, letterbox, inference, NMS, draw, write; model start-up included) on a
    generated 640x480 mp4, in frames per second: {"detect_fps": .pt, "detect_<runtime>_fps": ...} for
    each of `runtimes` ('onnx', 'int8' (+ 'int8_fixed'), 'openvino'; see detect_files); a runtime that
    fails gets a failed(...) text."""
    from engine import predictor
    from engine.checkpoint import checkpoint_dict, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        video = _clip(Path(tmp) / "clip.mp4", frames)
        weights = save_checkpoint(checkpoint_dict(model), Path(tmp) / "model.pt")
        fps = {}
        head_prefix = f"/model.{len(model.model) - 1}/"  # the Detect head's ONNX node prefix, kept float
        for runtime, path in detect_files(weights, head_prefix, runtimes).items():
            key = "detect_fps" if runtime == "pt" else f"detect_{runtime}_fps"
            if isinstance(path, str):
                fps[key] = path
                continue
            imgsz = (480, 640) if runtime == "int8_fixed" else 640  # the fixed file's own shape
            t0 = time.perf_counter()
            try:
                predictor.run(weights=path, source=video, imgsz=imgsz, device="cpu", project=tmp,
                              name=runtime)
                fps[key] = frames / (time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001
                fps[key] = failed(f"detect.py with {path.name}", err)
        return fps


NO_NATIVE_BF16 = "n/a (no native bf16)"
LATENCY_COLUMNS = ("cpu_ms", "cpu_fused_ms", "bf16_ms", "onnx_ms", "onnx_int8_ms", "openvino_ms",
                   "openvino_bf16_ms", "openvino_int8_ms", "openvino_nncf_ms")


def measure(cfg: str, args: argparse.Namespace) -> dict:
    name = Path(cfg).name
    LOGGER.info(f"benchmarking {name} ...")
    model = DetectionModel(cfg).eval()
    row = {
        "model": name,
        "params": count_parameters(model),
        "gflops": count_flops(model, args.imgsz) / 1e9,
        "cpu_ms": torch_latency(model, args.imgsz, args.runs, args.warmup),
    }
    if args.detect_fps:
        asked = (("onnx", args.onnx), ("int8", args.int8), ("openvino", args.openvino))
        runtimes = [runtime for runtime, on in asked if on]
        row.update(detect_fps(model, args.detect_frames, runtimes))
    row.update(runtime_latencies(model, args))  # every runtime timed through detect.py's runners
    model.fuse()
    row["fused_params"] = count_parameters(model)
    if args.train_step:
        row["train_step_ms"] = train_step_ms(cfg, args.imgsz, args.train_batch, max(args.runs // 3, 2))
    if args.memory:
        from engine.memory import training_step_peak_memory

        row["train_peak_mb"] = training_step_peak_memory(cfg, args.imgsz, args.train_batch) / 2**20
    add_throughput(row)
    return row


def runtime_latencies(model: DetectionModel, args: argparse.Namespace) -> dict[str, float | str]:
    """The fused checkpoint and each requested runtime/precision, timed at batch 1 through InferenceBackend
    (what detect.py and val.py run): cpu_fused_ms, bf16_ms, onnx_ms, onnx_int8_ms, openvino_ms,
    openvino_bf16_ms, openvino_int8_ms (the QDQ file in OpenVINO) and openvino_nncf_ms (NNCF's INT8 IR)."""
    from engine.checkpoint import checkpoint_dict, save_checkpoint
    from engine.precision import cpu_bf16_support

    timing = (args.imgsz, args.runs, args.warmup)
    native_bf16 = args.bf16 and cpu_bf16_support().native
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_checkpoint(checkpoint_dict(model), Path(tmp) / "model.pt")
        row: dict[str, float | str] = {"cpu_fused_ms": backend_latency(weights, *timing)}
        if args.bf16:
            row["bf16_ms"] = _guarded("bf16", lambda: backend_latency(weights, *timing, bf16=True)) \
                if native_bf16 else NO_NATIVE_BF16
        runtimes = [name for name, on in (("onnx", args.onnx), ("openvino", args.openvino)) if on]
        files = runtime_files(weights, args.imgsz, runtimes, int8=args.int8)
        for name, path in files.items():
            row[f"{name}_ms"] = path if isinstance(path, str) else _guarded(
                name, lambda path=path: backend_latency(path, *timing))
        if args.openvino and args.bf16:
            ir = files.get("openvino")
            row["openvino_bf16_ms"] = NO_NATIVE_BF16 if not native_bf16 else ir if isinstance(ir, str) else \
                _guarded("OpenVINO bf16", lambda: backend_latency(ir, *timing, bf16=True))
        return row


def add_throughput(row: dict) -> None:
    """`<x>_gflops_s` = GFLOPs / latency for every measured latency column `<x>_ms` (effective GFLOP/s)."""
    for key in LATENCY_COLUMNS:
        value = row.get(key)
        if isinstance(value, float) and value > 0:
            row[f"{key[:-3]}_gflops_s"] = row["gflops"] / (value / 1e3)


def machine_line() -> str:
    one, two = sgemm_gflops(1), sgemm_gflops(2)
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"Machine: float32 sgemm (torch.mm 2048x2048) {one:.1f} GFLOP/s on 1 thread, {two:.1f} GFLOP/s "
            f"on 2 threads; torch CPU capability {capability}; {torch.get_num_threads()} torch threads")


def precision_maps(weights: str, data: str, imgsz: int, workers: int = 0) -> list[tuple[str, float | str]]:
    """val mAP50-95 of a trained checkpoint in each precision, all at batch 1 with rectangular inputs
    (dynamic exports), so that only the precision differs. Exports go to a temporary folder."""
    import os

    from engine import precision
    from engine.exporter import export_and_verify
    from engine.quantize import val_map

    def val(path, bf16=False) -> float:
        return val_map(path, data, imgsz, batch_size=1, workers=workers, bf16=bf16)

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(weights).name
        shutil.copy(weights, local)
        exports = export_and_verify(local, include=("onnx",), imgsz=imgsz, dynamic=True, int8=True,
                                    data=data, int8_tolerance=float("inf"), workers=workers)
        int8 = exports["onnx_int8"].metrics
        native = precision.cpu_bf16_support().native
        previous = os.environ.get(precision.EMULATED_BF16_ENV)
        os.environ[precision.EMULATED_BF16_ENV] = "1"  # measure bf16 accuracy even where it is emulated
        try:
            bf16 = val(local, bf16=True)
        finally:
            if previous is None:
                os.environ.pop(precision.EMULATED_BF16_ENV)
            else:
                os.environ[precision.EMULATED_BF16_ENV] = previous
        maps = [("eager fp32", val(local)), ("eager bf16" + ("" if native else " (emulated)"), bf16),
                ("ONNX Runtime fp32", int8["map_float"]),
                (f"ONNX Runtime INT8 (ops '{int8['ops']}')", int8["map_int8"])]
        try:  # the float IR and NNCF's INT8 IR (export.py's default), both validated by the INT8 gate
            exported = export_and_verify(local, include=("openvino",), imgsz=imgsz, dynamic=True, int8=True,
                                         data=data, int8_tolerance=float("inf"), workers=workers)
            folder, nncf = exported["openvino"].path, exported["openvino_int8"].metrics
        except Exception as err:  # noqa: BLE001 -- the other precisions are still worth reporting
            return [*maps, ("OpenVINO fp32", failed("dynamic OpenVINO export", err))]
        maps += [("OpenVINO fp32", nncf["map_float"]), (f"OpenVINO INT8 ({nncf['ops']})", nncf["map_int8"])]
        if native:  # OpenVINO does not emulate bf16
            maps.append(("OpenVINO bf16", val(folder, bf16=True)))
        return maps


def _cell(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4f}"


def add_ratios(rows: list[dict]) -> None:
    """Add `<column>_x` = value / yolov5s's value for every numeric column (needs yolov5s in the run)."""
    ref = next((r for r in rows if r["model"] == REFERENCE), None)
    if ref is None:
        return
    keys = [k for k in ref if k != "model"]  # before the loop adds ref's own `_x` keys
    for row in rows:
        for key in keys:
            value, base = row.get(key), ref.get(key)
            if isinstance(value, (int, float)) and isinstance(base, (int, float)) and base:
                row[f"{key}_x"] = value / base


def to_markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if not k.endswith("_x")))
    header = "| " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            text = f"{v:,}" if isinstance(v, int) else f"{v:.3g}" if isinstance(v, float) and v < 1 else \
                f"{v:.1f}" if isinstance(v, float) else str(v)
            if f"{k}_x" in row:
                text += f" ({row[f'{k}_x']:.2f}x)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plugin", nargs="+", default=[], metavar="FILE",
                   help="Python file(s) that register backbones (docs/bring-a-backbone.md)")
    p.add_argument("--cfg", nargs="+", default=None,
                   help="model YAMLs (default: every configs/models/*.yaml)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); exports run with their runtime's defaults, "
                        "as detect.py runs them")
    p.add_argument("--onnx", action="store_true", help="also time the fused ONNX export with ONNX Runtime")
    p.add_argument("--int8", action="store_true",
                   help="also time its INT8 (QDQ) model with ONNX Runtime; with --openvino also the QDQ file "
                        "in OpenVINO and NNCF's INT8 IR")
    p.add_argument("--openvino", action="store_true", help="also time the fused model with OpenVINO (CPU)")
    p.add_argument("--bf16", action="store_true",
                   help="also time eager bf16 autocast (where the CPU has native bf16; else n/a)")
    p.add_argument("--train-step", action="store_true", help="also time one training step")
    p.add_argument("--detect-fps", action="store_true",
                   help="also run detect.py on a 640x480 video (frames/s)")
    p.add_argument("--detect-frames", type=int, default=300, help="frames of the --detect-fps clip")
    p.add_argument("--map-data", default="",
                   help="dataset YAML: also report the val mAP50-95 of --map-weights in each precision")
    p.add_argument("--map-weights", default="", help="trained checkpoint (.pt) for --map-data")
    p.add_argument("--memory", action="store_true",
                   help="also measure peak training memory (engine/memory.py)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-speed", action="store_true",
                   help="only measure training images/s of the trainer step per --variants (engine/train_speed.py)")
    p.add_argument("--variants", nargs="+", default=["fp32", "channels-last", "compile", "bf16"],
                   help="--train-speed variants: fp32 channels-last compile channels-last+compile bf16 "
                        "bf16+channels-last")
    p.add_argument("--steps", type=int, default=20, help="--train-speed: timed steps per variant")
    p.add_argument("--device", default="cpu", help="--train-speed: cpu or a CUDA index such as 0")
    p.add_argument("--loader", default="",
                   help="dataset YAML: also report loader images/s (mosaic, 2 workers)")
    p.add_argument("--files", nargs="+", default=[], metavar="LABEL=PATH",
                   help="time these existing files instead (ours or another project's exports, e.g. "
                        "YOLOv5's), alternating rounds in one process; the first is the ratios' reference")
    p.add_argument("--out", default="benchmarks", help="write <out>.md and <out>.csv")
    return p.parse_args(argv)


def files_report(args: argparse.Namespace) -> int:
    """--files: median latency of each file (alternating rounds) and, with --map-data, its val mAP."""
    from engine.latency import alternating_latency, latency_table, parse_file_args

    files = parse_file_args(args.files)
    rows = alternating_latency(files, args.imgsz, args.runs, args.warmup)
    table = latency_table(rows, args.runs) + "\n\n" + machine_line()
    if args.map_data:
        from engine.quantize import val_map

        for row in rows:
            row["map50_95"] = _guarded(f"val of {row['file']}", lambda row=row: val_map(
                Path(row["path"]), args.map_data, args.imgsz, batch_size=1))
        table += (f"\n\nval mAP50-95 on {args.map_data} ({args.imgsz} px or the file's fixed shape, "
                  "batch 1):\n\n"
                  "| file | mAP50-95 |\n|---|---|\n"
                  + "\n".join(f"| {r['file']} | {_cell(r['map50_95'])} |" for r in rows))
    print(table)
    Path(f"{args.out}.md").write_text(table + "\n")
    write_csv(rows, Path(f"{args.out}.csv"))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    load_plugins(vars(args).pop("plugin"))
    keep_freed_memory()  # steady eager timings (utils/allocator.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = [str(resolve_config(c, "models")) for c in args.cfg] if args.cfg else \
        sorted(str(p) for p in (CONFIGS / "models").glob("*.yaml"))
    if args.files:  # a separate table: existing files side by side
        return files_report(args)
    if args.train_speed:  # a separate table: the trainer's step per speed option
        from engine.train_speed import train_speed_report

        return train_speed_report(cfgs, args)
    if not any(Path(c).name == REFERENCE for c in cfgs):
        cfgs.insert(0, str(resolve_config(REFERENCE, "models")))  # ratios need the reference
    if bool(args.map_data) != bool(args.map_weights):
        LOGGER.error("--map-data and --map-weights go together")
        return 2
    rows = []
    for cfg in cfgs:
        rows.append(measure(cfg, args))
        write_csv(rows, Path(f"{args.out}.csv"))  # after every model: a long run keeps what it measured
    add_ratios(rows)
    table = to_markdown(rows) + "\n\n" + machine_line()
    if args.map_data:
        maps = precision_maps(args.map_weights, args.map_data, args.imgsz)
        table += (f"\n\nmAP50-95 of {args.map_weights} on {args.map_data} (val, {args.imgsz} px, "
                  "batch 1):\n\n"
                  "| precision | mAP50-95 |\n|---|---|\n"
                  + "\n".join(f"| {n} | {_cell(m)} |" for n, m in maps))
    if args.loader:
        from data.throughput import loader_throughput

        ips = loader_throughput(args.loader, imgsz=args.imgsz, batch_size=16, workers=2)
        table += (f"\n\nLoader throughput ({args.loader}, {args.imgsz} px, mosaic, batch 16, 2 workers): "
                  f"{ips:.1f} images/s")
    print(table)
    Path(f"{args.out}.md").write_text(table + "\n")
    write_csv(rows, Path(f"{args.out}.csv"))
    return 0


if __name__ == "__main__":
    from engine.cli import run_cli

    run_cli(main)  # user errors: one message, exit 1 (--verbose: traceback)
