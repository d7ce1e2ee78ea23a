"""Reduced-precision settings shared by inference (bf16 on the CPU) and training (`train.py --amp`).

bfloat16 pays off on the CPU only where the hardware computes it natively: AVX-512 BF16 (Intel
Cooper Lake and later, AMD Zen 4 and later) or AMX-BF16 (Intel Sapphire Rapids and later). Elsewhere
(e.g. AVX2-only CPUs) PyTorch emulates bf16 through float32 and is slower than float32 while losing
accuracy, so bf16 is refused there with a message naming what was detected -- unless emulation is
asked for explicitly (`allow_emulated=True`, or the environment variable VITDET_EMULATED_BF16=1), which
is meant for measuring bf16 *accuracy* on any machine, not its speed.

`cpu_bf16_support()` is the one detector; tests monkeypatch it (`engine.precision.cpu_bf16_support`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

EMULATED_BF16_ENV = "VITDET_EMULATED_BF16"
CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Bf16Support:
    """Whether this CPU computes bf16 natively, and what was detected (for messages)."""

    native: bool
    detected: str


def _cpuinfo_flags() -> set[str]:
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_support() -> Bf16Support:
    """Native bf16 on this CPU: an `avx512_bf16` or `amx_bf16` flag in /proc/cpuinfo, or PyTorch's
    CPU capability AVX512_BF16 / AMX (where /proc/cpuinfo is not readable)."""
    capability = str(torch.backends.cpu.get_cpu_capability())
    flags = _cpuinfo_flags()
    found = [f for f in BF16_FLAGS if f in flags]
    native = bool(found) or capability.upper() in ("AVX512_BF16", "AMX")
    detected = f"torch CPU capability {capability}; " + (
        f"cpu flags {', '.join(found)}" if found else
        "no avx512_bf16 / amx_bf16 flag in /proc/cpuinfo" if flags else "/proc/cpuinfo not readable")
    return Bf16Support(native, detected)


def cpu_has_vnni() -> bool:
    """8-bit dot products with 32-bit accumulation (AVX-512 VNNI, AVX-VNNI or AMX-INT8) on this CPU, by
    /proc/cpuinfo; False where it cannot be read (the safe answer for INT8 weight ranges)."""
    return bool(_cpuinfo_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def emulation_allowed(allow_emulated: bool = False) -> bool:
    return allow_emulated or os.environ.get(EMULATED_BF16_ENV, "") not in ("", "0")


def check_cpu_bf16(what: str, allow_emulated: bool = False) -> bool:
    """Raise ValueError unless this CPU runs bf16 natively (or emulation is allowed).

    Returns True when bf16 runs emulated (allowed but not native), False when native.
    """
    support = cpu_bf16_support()
    if support.native:
        return False
    if emulation_allowed(allow_emulated):
        return True
    raise ValueError(
        f"{what}: this CPU lacks native bf16 (AVX-512 BF16 or AMX-BF16 needed; "
        f"detected: {support.detected}); "
        f"bf16 would be emulated, slower than float32. Run in float32, or set {EMULATED_BF16_ENV}=1 to "
        f"measure bf16 accuracy with emulation anyway")


def training_autocast(device: torch.device, amp: bool) -> tuple[bool, torch.dtype, bool]:
    """(autocast on, its dtype, GradScaler on) for training on `device`.

    CUDA always trains with float16 autocast and a GradScaler (as YOLOv5); `amp` (train.py --amp) adds
    bf16 autocast on a CPU with native bf16 (no scaler: bf16 has float32's range). --amp on another
    CPU or device type is refused with a ValueError.
    """
    if device.type == "cuda":
        return True, torch.float16, True
    if not amp:
        return False, torch.float32, False
    if device.type != "cpu":
        raise ValueError(f"--amp: mixed precision on {device.type} is not supported (CUDA: float16, "
                         f"CPU: bf16)")
    check_cpu_bf16("--amp (bf16 autocast on the CPU)")
    return True, torch.bfloat16, False
