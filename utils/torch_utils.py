"""Torch helpers: device selection (--device parsing), seeding, model statistics (parameters,
GFLOPs), timing."""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger(f"vitdet.{__name__}")


DEVICE_HELP = "'cpu', 'mps', '' (CUDA if available), 'cuda', 'cuda:N', a CUDA index 'N', or a list 'N,M'"


@dataclass(frozen=True)
class DeviceRequest:
    """What a --device value asks for: kind 'auto' (CUDA if available, else CPU), 'cpu', 'mps' or
    'cuda' with its device indices, in the order given."""

    kind: str
    indices: tuple[int, ...] = ()


def _cuda_index(item: str, device: object) -> int:
    """'1' or 'cuda:1' -> 1; 'cuda' -> 0 (what torch.device('cuda') means until set_device is called)."""
    digits = item.removeprefix("cuda:") if item.startswith("cuda:") else ("0" if item == "cuda" else item)
    if not digits.isdecimal() or not digits.isascii():
        raise ValueError(f"--device {str(device)!r}: {item!r} is not a CUDA device; expected {DEVICE_HELP}")
    return int(digits)


def parse_device(device: str | int | torch.device = "") -> DeviceRequest:
    """The request in a --device value, without looking at the hardware (pure; see select_device).

    Accepts '', 'none', 'cpu', 'mps', 'cuda', 'cuda:N', 'N', 'N,M' (items may also be 'cuda:N'), an int
    or a torch.device, in any case and with spaces around items. Raises ValueError naming the value.
    """
    text = str(device).strip().lower()
    if text in ("", "none"):
        return DeviceRequest("auto")
    if text in ("cpu", "mps"):
        return DeviceRequest(text)
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise ValueError(f"--device {str(device)!r}: empty item in the list; expected {DEVICE_HELP}")
    indices = tuple(_cuda_index(item, device) for item in items)
    if len(set(indices)) != len(indices):
        raise ValueError(f"--device {str(device)!r}: a CUDA device is listed twice")
    return DeviceRequest("cuda", indices)


def select_device(device: str | int | torch.device = "") -> torch.device:
    """The torch.device for a --device value (see parse_device for the spellings).

    '' -> cuda:0 if CUDA is available, else the CPU; 'cuda' -> cuda:0; 'cuda:N' or 'N' -> cuda:N;
    'N,M' -> cuda:N (DDP sets each rank's device itself). A CUDA or MPS request that this machine
    cannot serve is a ValueError naming the request, never a silent CPU run.
    """
    request = parse_device(device)
    if request.kind == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if request.kind == "cpu":
        return torch.device("cpu")
    if request.kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {str(device)!r}: MPS (Apple GPU) is not available here; "
                             f"use --device cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device {str(device)!r} asks for CUDA, but CUDA is not available here (torch "
                         f"{torch.__version__}, {build}); use --device cpu")
    count = torch.cuda.device_count()
    missing = [i for i in request.indices if i >= count]
    if missing:
        present = ", ".join(map(str, range(count))) or "none"
        raise ValueError(f"--device {str(device)!r}: only {count} CUDA device(s) present ({present})")
    return torch.device(f"cuda:{request.indices[0]}")


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


def strided_pointwise_convs(model: nn.Module) -> list[str]:
    """Names of the model's 1x1 convolutions with a stride above 1 (torch's CPU channels-last backward of
    these corrupts memory in the torch builds measured here; the trainer refuses --channels-last for them)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1]


def time_sync(device: torch.device | None = None) -> float:
    """perf_counter after waiting for queued CUDA work (accurate GPU timings)."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()
