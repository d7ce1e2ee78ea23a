"""Config-file resolution, run-folder naming and small file helpers shared by the front ends."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from utils.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def resolve_config(name: str | Path, kind: str) -> Path:
    """Find a YAML by path, or by bare name in configs/<kind>/ ('models', 'data' or 'hyps').

    'yolov5s', 'yolov5s.yaml' and 'configs/models/yolov5s.yaml' all resolve to the same file. An unknown
    name raises FileNotFoundError listing the closest known names.
    """
    path = Path(name)
    if path.is_file():
        return path.resolve()
    folder = CONFIGS / kind
    candidates = [folder / path.name, folder / f"{path.name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in folder.glob("*.yaml"))
    close = difflib.get_close_matches(path.name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(
        f"{kind} config {str(name)!r} not found (looked for the path and in {folder}).{hint} "
        f"Known: {', '.join(known) or 'none'}"
    )


def yaml_load(path: str | Path) -> dict[str, Any]:
    with open(path, errors="ignore") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, found {type(data).__name__}")
    return data


def yaml_save(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` as YAML (Paths become strings), atomically."""
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
    atomic_write_text(path, yaml.safe_dump(plain, sort_keys=False))


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/train/exp -> runs/train/exp2, exp3, ... unless exist_ok; never reuses an existing folder."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        for n in range(2, 10000):
            candidate = Path(f"{stem}{sep}{n}{suffix}")
            if not candidate.exists():
                path = candidate
                break
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of `divisor` >= x (YOLOv5's channel rounding)."""
    return int(-(-x // divisor) * divisor)
