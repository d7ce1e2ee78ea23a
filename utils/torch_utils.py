"""Torch helpers: device selection, seeding, model statistics (parameters, GFLOPs), timing."""

from __future__ import annotations

import logging
import os
import random
import time

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def select_device(device: str | int | torch.device = "") -> torch.device:
    """'' -> first CUDA device if available else CPU; 'cpu'; '0' or 0 -> cuda:0; '0,1' -> cuda:0 (DDP sets
    the rank's device itself). A CUDA request on a machine without CUDA is an error, not a silent CPU run."""
    if isinstance(device, torch.device):
        return device
    spec = str(device).strip().lower().replace("cuda:", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec in ("", "none"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "mps":
        return torch.device("mps")
    ids = [s for s in spec.split(",") if s]
    if not all(s.isdigit() for s in ids):
        raise ValueError(f"--device {device!r}: expected 'cpu', 'mps', a CUDA index like '0', or a list '0,1'")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asks for CUDA, but CUDA is not available here; use --device cpu")
    if int(ids[0]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(f"cuda:{ids[0]}")


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with `deterministic`, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        os.environ["PYTHONHASHSEED"] = str(seed)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, imgsz: int | tuple[int, int] = 640, channels: int = 3) -> float:
    """FLOPs of one forward at batch 1 (2 x multiply-adds, attention matmuls included)."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    p = next(model.parameters())
    x = torch.zeros(1, channels, h, w, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


def model_info(model: nn.Module, imgsz: int | tuple[int, int] = 640, verbose: bool = False) -> dict[str, float]:
    """Log and return {'layers', 'parameters', 'gradients', 'gflops'} (GFLOPs at `imgsz`, batch 1)."""
    n_p = count_parameters(model)
    n_g = count_parameters(model, trainable_only=True)
    layers = len(list(model.modules()))
    if verbose:
        for name, p in model.named_parameters():
            LOGGER.info(f"{name:60s} {str(list(p.shape)):24s} {p.numel():>10d} grad={p.requires_grad}")
    gflops = count_flops(model, imgsz, getattr(model, "yaml", {}).get("ch", 3)) / 1e9
    size = imgsz if isinstance(imgsz, int) else f"{imgsz[0]}x{imgsz[1]}"
    name = getattr(model, "yaml", {}).get("yaml_file", type(model).__name__)
    LOGGER.info(f"{name} summary: {layers} layers, {n_p:,} parameters, {n_g:,} gradients, "
                f"{gflops:.1f} GFLOPs at {size}")
    return {"layers": layers, "parameters": n_p, "gradients": n_g, "gflops": gflops}


def time_sync(device: torch.device | None = None) -> float:
    """perf_counter after waiting for queued CUDA work (accurate GPU timings)."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()
