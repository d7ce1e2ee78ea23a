"""utils/allocator.py: freed blocks stay in glibc's heap (steady eager timings), and the entry points ask
for it. Checked in a fresh interpreter, since mallopt settings belong to the whole process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import ctypes
    from utils.allocator import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    applied = keep_freed_memory()
    before = libc.mallinfo2()
    block = libc.malloc(20 << 20)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    print(applied, (during.hblkhd - before.hblkhd) >> 20, after.fordblks >> 20)
""")


def probe(env_value: str | None) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("VITDET_MALLOC", "GLIBC_TUNABLES")}
    if env_value is not None:
        env["VITDET_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt/mallinfo2")
def test_a_freed_20mb_block_stays_in_the_heap_unless_turned_off():
    applied, mmapped_mb, free_in_heap_mb = probe(None)
    assert (applied, mmapped_mb) == ("True", 0) and free_in_heap_mb >= 20  # served by and kept in the heap
    applied, mmapped_mb, free_in_heap_mb = probe("default")
    assert (applied, mmapped_mb) == ("False", 20) and free_in_heap_mb < 20  # glibc's default: mmap, unmap


def test_detect_and_val_ask_for_it_before_anything_else(monkeypatch, tmp_path):
    import detect
    import val

    calls = []
    for module in (detect, val):
        monkeypatch.setattr(module, "keep_freed_memory", lambda n=module.__name__: calls.append(n) or True)
    assert detect.main(["--weights", str(tmp_path / "missing.pt"), "--source", str(tmp_path)]) == 1
    assert val.main(["--weights", str(tmp_path / "missing.pt"), "--data", "builtin.yaml"]) == 1
    assert calls == ["detect", "val"]
