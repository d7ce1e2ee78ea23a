"""Run train.py and SIGKILL the process at the N-th file event around its saves (test helper).

    python tests/kill_during_saves.py N train.py-arguments...

Events are counted from process start: every torch.save (the kill comes half-way through writing the
bytes: a kill during a write) and every os.replace (the kill comes right after the rename: between
two writes). Before dying the process prints one line `KILLED <kind> <file name>` to stderr, so the
test knows which points it covered. N = 0 never kills.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _die(kind: str, name: str) -> None:
    print(f"KILLED {kind} {name}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill_at: int) -> None:
    count = [0]
    real_save, real_replace = torch.save, os.replace

    def counted() -> bool:
        count[0] += 1
        return count[0] == kill_at

    def save(obj, f, *args, **kwargs):
        if not counted() or isinstance(f, (str, os.PathLike)):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        _die("mid-save", Path(getattr(f, "name", "?")).name)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if counted():
            _die("after-rename", Path(dst).name)

    torch.save, os.replace = save, replace


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    install(int(sys.argv[1]))
    import train

    sys.exit(train.main(sys.argv[2:]))
