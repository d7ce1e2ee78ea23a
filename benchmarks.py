"""Speed and size of every model YAML, each also as a ratio to yolov5s measured in the same run.

    python benchmarks.py                                  # all configs/models/*.yaml, 640 px, CPU
    python benchmarks.py --cfg yolov5n.yaml yolov5-fastvit.yaml --onnx --train-step
    python benchmarks.py --cfg yolov5n.yaml --loader bccd.yaml   # + data-loader images/s (mosaic on)
    python benchmarks.py --cfg yolov5n.yaml --bf16 --onnx --int8 --openvino   # every runtime/precision
    python benchmarks.py --cfg yolov5n.yaml --map-data bccd.yaml --map-weights best.pt   # + mAP per precision

Columns: parameters, GFLOPs at --imgsz (batch 1, torch.utils.flop_counter), median CPU latency at
batch 1 after warm-up for the model as built and after fuse() (Conv+BN folding and backbone
reparameterisation), and, opt-in, the fused model under other runtimes and precisions: eager bf16
(`--bf16`: torch.autocast bf16, Detect head float32; only where the CPU has native bf16, else
'n/a (no native bf16)'), ONNX Runtime float32 (`--onnx`), ONNX Runtime INT8 (`--int8`: the static QDQ
quantisation of export.py --int8, calibrated here on 4 random images -- right for latency, not for
accuracy) and OpenVINO float32 (`--openvino`, CPU device). Each latency column `<x>_ms` comes with
`<x>_gflops_s`, the effective throughput GFLOPs / latency (INT8 counts the same nominal FLOPs). Also
opt-in: detect.py frames/s end to end on a generated 640x480 video of --detect-frames frames (300), the
time of one training step (forward + backward of a stand-in loss at --train-batch) and peak training
memory. Under the table: this machine's measured float32 sgemm throughput (torch.mm 2048x2048, 1 and 2
threads) to compare the GFLOP/s with, and with --map-data/--map-weights the val mAP50-95 of a trained
checkpoint in each precision (eager fp32, bf16 -- emulated and labelled so where the CPU lacks native
bf16 --, ORT fp32, ORT INT8 calibrated on the dataset's train split, OpenVINO fp32).

Figures from one machine at one moment vary; the ratios to yolov5s (measured in the same run) are what
to compare. Writes a markdown table (stdout and --out .md) and a CSV (--out .csv).
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from models.yolo import DetectionModel
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


def export_onnx(model: DetectionModel, imgsz: int, folder: Path) -> Path:
    """The fused model exported to ONNX at batch 1 (fixed shape) in `folder`."""
    model = copy.deepcopy(model).eval()
    model.model[-1].export = True
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, imgsz, imgsz),), str(path), opset_version=17,
                          input_names=["images"], output_names=["output0"], dynamo=False)
    return path


def ort_latency(path: Path, imgsz: int, runs: int, warmup: int, threads: int = 0) -> float:
    """ONNX Runtime (CPU) latency of an ONNX file at batch 1."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": torch.rand(1, 3, imgsz, imgsz).numpy()}
    return median_latency_ms(lambda: session.run(None, feed), runs, warmup)


def onnx_latency(model: DetectionModel, imgsz: int, runs: int, warmup: int, threads: int = 0) -> float:
    """ONNX Runtime (CPU) latency of the fused model exported at batch 1."""
    with tempfile.TemporaryDirectory() as tmp:
        return ort_latency(export_onnx(model, imgsz, Path(tmp)), imgsz, runs, warmup, threads)


def int8_latency(model: DetectionModel, imgsz: int, runs: int, warmup: int, threads: int = 0) -> float:
    """ONNX Runtime latency of the INT8 (QDQ, U8S8) quantisation of the fused export, calibrated on 4
    random images (the settings of export.py --int8; calibration data does not change the speed)."""
    from engine.quantize import quantize_onnx_int8

    rng = np.random.default_rng(0)
    batches = [rng.random((1, 3, imgsz, imgsz), dtype=np.float32) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        float_file = export_onnx(model, imgsz, Path(tmp))
        int8_file = Path(tmp) / "model_int8.onnx"
        quantize_onnx_int8(float_file, int8_file, batches, head_prefix=f"/model.{len(model.model) - 1}/")
        return ort_latency(int8_file, imgsz, runs, warmup, threads)


def openvino_latency(model: DetectionModel, imgsz: int, runs: int, warmup: int, threads: int = 0) -> float:
    """OpenVINO (CPU device, float32) latency of the fused model converted from its ONNX export."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        ov_model = ov.convert_model(str(export_onnx(model, imgsz, Path(tmp))))
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    x = torch.rand(1, 3, imgsz, imgsz).numpy()
    return median_latency_ms(lambda: request.infer({0: x}), runs, warmup)


def bf16_latency(model: DetectionModel, imgsz: int, runs: int, warmup: int) -> float:
    """Eager latency under bf16 autocast, Detect head float32 (as InferenceBackend(bf16=True) runs it)."""
    from engine.backend import keep_float32

    model = copy.deepcopy(model).eval()
    keep_float32(model.model[-1], "cpu")
    x = torch.rand(1, 3, imgsz, imgsz)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return median_latency_ms(lambda: model(x), runs, warmup)


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


def detect_fps(model: DetectionModel, frames: int = 300) -> float:
    """detect.py end to end (read, letterbox, fused inference, NMS, draw, write) on a generated 640x480
    mp4; frames per second."""
    import cv2
    import numpy as np

    from engine import predictor
    from engine.checkpoint import checkpoint_dict, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.mp4"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
        rng = np.random.default_rng(0)
        for _ in range(frames):
            writer.write(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        writer.release()
        weights = save_checkpoint(checkpoint_dict(model), Path(tmp) / "model.pt")
        t0 = time.perf_counter()
        predictor.run(weights=weights, source=video, imgsz=640, device="cpu", project=tmp, name="detect")
        return frames / (time.perf_counter() - t0)


NO_NATIVE_BF16 = "n/a (no native bf16)"
LATENCY_COLUMNS = ("cpu_ms", "cpu_fused_ms", "bf16_ms", "onnx_ms", "onnx_int8_ms", "openvino_ms")


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
        row["detect_fps"] = detect_fps(model, args.detect_frames)
    model.fuse()
    row["fused_params"] = count_parameters(model)
    row["cpu_fused_ms"] = torch_latency(model, args.imgsz, args.runs, args.warmup)
    timing = (args.imgsz, args.runs, args.warmup)
    if args.bf16:
        from engine.precision import cpu_bf16_support

        row["bf16_ms"] = bf16_latency(model, *timing) if cpu_bf16_support().native else NO_NATIVE_BF16
    if args.onnx:
        row["onnx_ms"] = onnx_latency(model, *timing, args.threads)
    if args.int8:
        row["onnx_int8_ms"] = int8_latency(model, *timing, args.threads)
    if args.openvino:
        row["openvino_ms"] = openvino_latency(model, *timing, args.threads)
    if args.train_step:
        row["train_step_ms"] = train_step_ms(cfg, args.imgsz, args.train_batch, max(args.runs // 3, 2))
    if args.memory:
        from engine.memory import training_step_peak_memory

        row["train_peak_mb"] = training_step_peak_memory(cfg, args.imgsz, args.train_batch) / 2**20
    add_throughput(row)
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


def precision_maps(weights: str, data: str, imgsz: int, workers: int = 0) -> list[tuple[str, float]]:
    """val mAP50-95 of a trained checkpoint in each precision, all at batch 1 with rectangular inputs
    (dynamic exports), so that only the precision differs. Exports go to a temporary folder."""
    import os

    from engine import precision
    from engine.evaluation import EvalOptions, evaluate
    from engine.exporter import export_and_verify

    def val(path, bf16=False) -> float:
        with tempfile.TemporaryDirectory() as out:
            options = EvalOptions(weights=path, data=data, imgsz=imgsz, batch_size=1, device="cpu",
                                  workers=workers, plots=False, project=out, bf16=bf16)
            results, _ = evaluate(options)
        return float(results.map)

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(weights).name
        shutil.copy(weights, local)
        exports = export_and_verify(local, include=("onnx", "openvino"), imgsz=imgsz, dynamic=True, int8=True,
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
        return [("eager fp32", val(local)), ("eager bf16" + ("" if native else " (emulated)"), bf16),
                ("ONNX Runtime fp32", int8["map_float"]), ("ONNX Runtime INT8", int8["map_int8"]),
                ("OpenVINO fp32", val(exports["openvino"].path))]


def add_ratios(rows: list[dict]) -> None:
    """Add `<column>_x` = value / yolov5s's value for every numeric column (needs yolov5s in the run)."""
    ref = next((r for r in rows if r["model"] == REFERENCE), None)
    if ref is None:
        return
    for row in rows:
        for key in [k for k in ref if k != "model"]:
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
    p.add_argument("--cfg", nargs="+", default=None,
                   help="model YAMLs (default: every configs/models/*.yaml)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--onnx", action="store_true", help="also time the fused ONNX export with ONNX Runtime")
    p.add_argument("--int8", action="store_true", help="also time its INT8 (QDQ) model with ONNX Runtime")
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
    p.add_argument("--loader", default="",
                   help="dataset YAML: also report loader images/s (mosaic, 2 workers)")
    p.add_argument("--out", default="benchmarks", help="write <out>.md and <out>.csv")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = [str(resolve_config(c, "models")) for c in args.cfg] if args.cfg else \
        sorted(str(p) for p in (CONFIGS / "models").glob("*.yaml"))
    if not any(Path(c).name == REFERENCE for c in cfgs):
        cfgs.insert(0, str(resolve_config(REFERENCE, "models")))  # ratios need the reference
    if bool(args.map_data) != bool(args.map_weights):
        LOGGER.error("--map-data and --map-weights go together")
        return 2
    rows = [measure(cfg, args) for cfg in cfgs]
    add_ratios(rows)
    table = to_markdown(rows) + "\n\n" + machine_line()
    if args.map_data:
        maps = precision_maps(args.map_weights, args.map_data, args.imgsz)
        table += (f"\n\nmAP50-95 of {args.map_weights} on {args.map_data} (val, {args.imgsz} px, "
                  "batch 1):\n\n"
                  "| precision | mAP50-95 |\n|---|---|\n" + "\n".join(f"| {n} | {m:.4f} |" for n, m in maps))
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
    sys.exit(main())
