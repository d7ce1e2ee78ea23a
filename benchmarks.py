"""Speed and size of every model YAML, each also as a ratio to yolov5s measured in the same run.

    python benchmarks.py                                  # all configs/models/*.yaml, 640 px, CPU
    python benchmarks.py --cfg yolov5n.yaml yolov5-fastvit.yaml --onnx --train-step
    python benchmarks.py --cfg yolov5n.yaml --loader bccd.yaml   # + data-loader images/s (mosaic on)

Columns: parameters, GFLOPs at --imgsz (batch 1, torch.utils.flop_counter), median CPU latency at
batch 1 after warm-up for the model as built and after fuse() (Conv+BN folding and backbone
reparameterisation), optionally ONNX Runtime latency of the fused export, detect.py frames/s end to end
on a 640x480 video, the time of one training step (forward + backward of a stand-in loss at
--train-batch), and peak training memory. Figures from one machine at one
moment vary; the ratios to yolov5s (measured in the same run) are what to compare.
Writes a markdown table (stdout and --out .md) and a CSV (--out .csv).
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def onnx_latency(model: DetectionModel, imgsz: int, runs: int, warmup: int) -> float:
    """ONNX Runtime (CPU) latency of the fused model exported at batch 1."""
    import onnxruntime as ort

    model = copy.deepcopy(model).eval()
    model.model[-1].export = True
    x = torch.rand(1, 3, imgsz, imgsz)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (x,), str(path), opset_version=17, input_names=["images"],
                          output_names=["output0"], dynamo=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"images": x.numpy()}
        return median_latency_ms(lambda: session.run(None, feed), runs, warmup)


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


def detect_fps(model: DetectionModel, frames: int = 20) -> float:
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
        row["detect_fps"] = detect_fps(model)
    model.fuse()
    row["fused_params"] = count_parameters(model)
    row["cpu_fused_ms"] = torch_latency(model, args.imgsz, args.runs, args.warmup)
    if args.onnx:
        row["onnx_ms"] = onnx_latency(model, args.imgsz, args.runs, args.warmup)
    if args.train_step:
        row["train_step_ms"] = train_step_ms(cfg, args.imgsz, args.train_batch, max(args.runs // 3, 2))
    if args.memory:
        from engine.memory import training_step_peak_memory

        row["train_peak_mb"] = training_step_peak_memory(cfg, args.imgsz, args.train_batch) / 2**20
    return row


def add_ratios(rows: list[dict]) -> None:
    """Add `<column>_x` = value / yolov5s's value for every numeric column (needs yolov5s in the run)."""
    ref = next((r for r in rows if r["model"] == REFERENCE), None)
    if ref is None:
        return
    for row in rows:
        for key in [k for k in ref if k != "model"]:
            if ref.get(key):
                row[f"{key}_x"] = row[key] / ref[key]


def to_markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if not k.endswith("_x")]
    header = "| " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            text = f"{v:,}" if isinstance(v, int) else f"{v:.1f}" if isinstance(v, float) else str(v)
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
    p.add_argument("--cfg", nargs="+", default=None, help="model YAMLs (default: every configs/models/*.yaml)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--onnx", action="store_true", help="also time the fused ONNX export with ONNX Runtime")
    p.add_argument("--train-step", action="store_true", help="also time one training step")
    p.add_argument("--detect-fps", action="store_true", help="also run detect.py on a 640x480 video (frames/s)")
    p.add_argument("--memory", action="store_true", help="also measure peak training memory (engine/memory.py)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--loader", default="", help="dataset YAML: also report loader images/s (mosaic, 2 workers)")
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
    rows = [measure(cfg, args) for cfg in cfgs]
    add_ratios(rows)
    table = to_markdown(rows)
    if args.loader:
        from data.throughput import loader_throughput

        ips = loader_throughput(args.loader, imgsz=args.imgsz, batch_size=16, workers=2)
        table += f"\n\nLoader throughput ({args.loader}, {args.imgsz} px, mosaic, batch 16, 2 workers): {ips:.1f} images/s"
    print(table)
    Path(f"{args.out}.md").write_text(table + "\n")
    write_csv(rows, Path(f"{args.out}.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
