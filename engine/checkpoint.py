"""Checkpoints: plain dictionaries of tensors and Python primitives, written atomically.

A checkpoint holds the model YAML (dict), class names, the model and EMA state_dicts, optimizer and
scheduler state, epoch, best fitness, training options, hyperparameters and RNG states. It loads with
`torch.load(..., weights_only=True)` (loading never runs code from the file) and is written to a
temporary file that is renamed over the target, so a kill during a save never leaves a broken file.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.files import atomic_open

CHECKPOINT_FORMAT = 1


def checkpoint_dict(model, ema=None, **fields: Any) -> dict[str, Any]:
    """The checkpoint of `model` (its YAML, names, float32 state_dict) plus `ema` and extra fields
    (epoch, best_fitness, optimizer, scheduler, opt, hyp, rng, ...)."""
    from datetime import datetime

    return {
        "format": CHECKPOINT_FORMAT,
        "yaml": plain_yaml(model.yaml),
        "names": list(model.names),
        "nc": int(model.nc),
        "stride": [float(s) for s in model.stride],
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ema": None if ema is None else {k: v.detach().clone() for k, v in ema.state_dict().items()},
        "date": datetime.now().isoformat(timespec="seconds"),
        **fields,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """torch.save into a temp file beside `path`, fsync, then rename over it (utils.files.atomic_open)."""
    with atomic_open(path, "wb", fsync=True) as f:
        torch.save(ckpt, f)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one of our checkpoints (weights_only=True); a clear error for other files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"{path}: not a checkpoint of this project that loads with weights_only=True "
                           f"({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "yaml" not in ckpt:
        raise RuntimeError(f"{path}: not a checkpoint of this project (expected keys 'model' and 'yaml')")
    return ckpt


def plain_yaml(model_yaml: dict) -> dict:
    """The model dict without build-time pretrained-weight paths (the state_dict already holds them)."""
    d = copy.deepcopy(model_yaml)
    for row in d.get("backbone", []):
        args = row[3] if isinstance(row, list) and len(row) == 4 else None
        if args and isinstance(args[0], dict):
            args[0].pop("weights", None)
    return d


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and primitives (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(obj):
    return [_to_plain(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuple(obj):
    return tuple(_to_tuple(o) for o in obj) if isinstance(obj, list) else obj


def load_detection_model(path: str | Path, device: str | torch.device = "cpu", fuse: bool = True,
                         use_ema: bool = True):
    """Rebuild the DetectionModel saved in a checkpoint, in eval mode (fused unless told otherwise).

    The EMA weights are used when the checkpoint has them (as YOLOv5 does for inference).
    """
    from models.yolo import DetectionModel

    ckpt = load_checkpoint(path)
    model = DetectionModel(plain_yaml(ckpt["yaml"]))
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    model.names = list(ckpt.get("names") or model.names)
    model.hyp = ckpt.get("hyp") or {}
    model = model.to(device).eval()
    return model.fuse() if fuse else model
