"""Atomic writes: the one place where files and folders are written beside their target and renamed.

A reader (or a process killed half-way) never sees half a file: the bytes go to a hidden temporary
name in the same folder, `.<name>.<random>.tmp<suffix>`, which is renamed over the target only when
the write finished. The temporary name is created with a plain `open(..., "x")`, so the final file
gets the permissions any new file gets here (the umask is honoured and never changed).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"


def temp_name_beside(target: str | Path, keep_suffix: bool = False) -> Path:
    """A fresh hidden path in `target`'s folder; `keep_suffix` ends it with target's suffix too
    (exporters and runtimes pick the file kind by its suffix)."""
    target = Path(target)
    tail = TEMP_SUFFIX + (target.suffix if keep_suffix else "")
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{tail}")


def stale_temp_files(target: str | Path) -> list[Path]:
    """Temporary files that an interrupted atomic write of `target` left behind."""
    target = Path(target)
    return sorted(p for p in target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}*") if p.is_file())


@contextlib.contextmanager
def atomic_path(target: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed over `target`, on any error removed.

        with atomic_path("model.onnx", keep_suffix=True) as tmp:
            torch.onnx.export(model, x, tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_beside(target, keep_suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    except Exception as err:
        disk_full = _disk_full_error(err, target)
        if disk_full is None:
            raise
        raise disk_full from err
    finally:
        tmp.unlink(missing_ok=True)


def _disk_full_error(err: Exception, target: Path) -> OSError | None:
    """A full disk or quota as one plain OSError naming the file (torch.save reports it as
    'enforce fail at inline_container.cc', with the errno only deep in the exception chain)."""
    seen = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "no space left on device" if cause.errno == errno.ENOSPC else "disk quota exceeded"
            return OSError(cause.errno, f"{reason} while writing {target} (the previous file, if any, is kept)")
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def atomic_open(target: str | Path, mode: str = "w", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing ('w' or 'wb'); it replaces `target` when the block ends cleanly.

    `fsync=True` flushes the data to disk before the rename (checkpoints: a power cut must not leave
    a renamed but empty file).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(target) as tmp:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write `text` to `target` atomically; returns the path."""
    with atomic_open(target, "w") as f:
        f.write(text)
    return Path(target)


@contextlib.contextmanager
def atomic_dir(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes `target`, on any error it is removed.

    replace=True removes a previous folder of that name first (the caller must have checked that it
    may); replace=False keeps a folder that another process put there meanwhile (a lost race, e.g.
    two loaders generating the same dataset) and drops ours.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_beside(target)
    tmp.mkdir()
    try:
        yield tmp
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
