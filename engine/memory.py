"""Peak memory of one training step of a detection model, for comparing backbones.

    python -m engine.memory --cfg yolov5-mpvit.yaml yolov5-fastvit.yaml yolov5s.yaml --imgsz 640 --batch 8

A training step is: forward in train mode on a (batch, 3, imgsz, imgsz) float32 input, a scalar loss
(the mean square of the raw head outputs; YOLOv5's loss touches only those outputs, so it adds little
memory), backward, and one SGD (momentum, nesterov) step. The figure is the extra memory the step needs
beyond the built model and its input:

- CUDA: `torch.cuda.max_memory_allocated()` during the step minus the allocated memory before it
  (tensors only; the caching allocator's reserve is not counted).
- CPU: the step runs in a fresh Python process (so earlier models leave no allocator state behind);
  after building, free heap pages are returned to the OS and the peak-RSS counter is reset, then the
  figure is the peak resident set size (VmHWM) during the step minus the resident set size before it.
  Linux only (it reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_CHILD_FLAG = "--child"


def training_step_peak_memory(cfg: str | Path | dict, imgsz: int = 640, batch: int = 8,
                              device: str | torch.device = "cpu") -> int:
    """Bytes of memory one training step of `cfg` needs beyond the model and its input (see module doc).

    cfg: a model YAML name (resolved against configs/models/), a path, or (CUDA only) a dict.
    On CPU the step runs in a subprocess; a failure there raises RuntimeError with its stderr tail.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_step_memory(cfg, imgsz, batch, device)
    if device.type != "cpu":
        raise ValueError(f"training_step_peak_memory: device {device} is neither cpu nor cuda")
    if isinstance(cfg, dict):
        raise TypeError("training_step_peak_memory: on CPU pass a YAML name or path "
                        "(the step runs in a subprocess)")
    command = [sys.executable, "-m", "engine.memory", _CHILD_FLAG, "--cfg", str(cfg),
               "--imgsz", str(imgsz), "--batch", str(batch)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training step of {cfg} at {imgsz}x{imgsz}, batch {batch} failed "
                           f"(exit {result.returncode}): {result.stderr[-2000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


def _build(cfg: str | Path | dict, device: torch.device) -> torch.nn.Module:
    from models.yolo import DetectionModel  # imported here: the model package is heavy

    return DetectionModel(cfg).to(device).train()


def _training_step(model: torch.nn.Module, images: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    outputs = model(images)
    loss = sum(o.float().square().mean() for o in outputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.937, nesterov=True)


def _cuda_step_memory(cfg: str | Path | dict, imgsz: int, batch: int, device: torch.device) -> int:
    model = _build(cfg, device)
    images = torch.rand(batch, 3, imgsz, imgsz, device=device)
    optimizer = _optimizer(model)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _training_step(model, images, optimizer)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field (Linux only)")


def _release_and_reset_peak() -> None:
    """Hand free heap pages back to the OS and restart the peak-RSS counter at the current RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline simply includes what the allocator keeps
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to VmRSS (Linux >= 4.0)
    except OSError:
        pass


def _cpu_step_memory_in_this_process(cfg: str, imgsz: int, batch: int) -> int:
    model = _build(cfg, torch.device("cpu"))
    images = torch.rand(batch, 3, imgsz, imgsz)
    optimizer = _optimizer(model)
    _release_and_reset_peak()
    before = _status_bytes("VmRSS")
    _training_step(model, images, optimizer)
    return _status_bytes("VmHWM") - before


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Peak memory of one training step per model YAML")
    parser.add_argument("--cfg", nargs="+", required=True, help="model YAML names or paths")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument(_CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.child:  # the CPU subprocess: one model, one JSON line on stdout
        peak = _cpu_step_memory_in_this_process(args.cfg[0], args.imgsz, args.batch)
        print(json.dumps({"peak_bytes": peak}))
        return
    for cfg in args.cfg:
        peak = training_step_peak_memory(cfg, args.imgsz, args.batch, args.device)
        print(f"{cfg:32s} imgsz {args.imgsz} batch {args.batch} {args.device}: {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
