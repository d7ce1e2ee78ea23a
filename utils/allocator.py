"""Keep freed memory in the process heap (glibc only), for steady eager CPU inference speed.

glibc's malloc serves large blocks (a 640 px feature map is several MB) from fresh mmap() pages and
trims the top of its heap whenever enough is free, with thresholds that slide with the process's
history. Eager PyTorch frees and re-allocates every activation on every forward pass, so how often a
pass page-faults its working set in again depends on what ran before: in benchmarks.py on the 2-core
AVX-512 machine, fused yolov5s at 640 took 171-208 ms in three runs (after the unfused model had run
in the same process) and 108-131 ms with fixed thresholds (README). ONNX Runtime and OpenVINO keep
their own arenas.

`keep_freed_memory()` fixes both thresholds (mallopt) so freed blocks up to 32 MB are reused; the
price is that the process keeps its peak heap instead of returning it to the system. The command-line
entry points (benchmarks.py, detect.py, val.py) call it first thing, never on import; the environment
variable VITDET_MALLOC=default turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

LOGGER = logging.getLogger(f"vitdet.{__name__}")

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30  # hand freed heap back to the system only above 1 GiB free at its top


def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks up to 32 MB instead of unmapping them; True when applied.

    False (nothing changed) off Linux, with a C library without mallopt, or with VITDET_MALLOC=default.
    """
    if os.environ.get("VITDET_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        # The C library already loaded in this process, not ctypes.util.find_library("c"): that runs
        # `ldconfig -p` in a subprocess, and forking a large multi-threaded process (ONNX Runtime, OpenVINO
        # and OpenMP threads) on every val/detect call crashed the test run on an AVX2 machine.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
               and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    LOGGER.debug(f"malloc: freed blocks kept in the heap: {applied}")
    return applied
