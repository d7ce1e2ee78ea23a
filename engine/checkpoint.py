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


class CheckpointError(RuntimeError):
    """A weights file that is not one of our checkpoints (a RuntimeError, as it was before this class)."""


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
        "backbone": backbone_record(model),
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
        raise CheckpointError(f"{path}: not a checkpoint of this project that loads with weights_only=True "
                           f"({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "yaml" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected keys 'model' and 'yaml')")
    return ckpt


def plain_yaml(model_yaml: dict) -> dict:
    """The model dict without build-time pretrained-weight paths or downloads (the state_dict already
    holds the weights, so a rebuild needs no file and no network)."""
    d = copy.deepcopy(model_yaml)
    for row in d.get("backbone", []):
        args = row[3] if isinstance(row, list) and len(row) == 4 else None
        if args and isinstance(args[0], dict):
            args[0].pop("weights", None)
            if args[0].get("pretrained"):
                args[0]["pretrained"] = False
    return d


def backbone_record(model) -> dict[str, Any] | None:
    """What rebuilding the backbone node needs beyond the YAML: its registered name, the plugin file
    that registered it (None for the shipped families) and the node's own record (a timm node: model
    name, timm version, options). None for a YAML-rows backbone."""
    from models.backbones import BACKBONES, Backbone

    node = model.model[0] if len(model.model) else None
    if not isinstance(node, Backbone):
        return None
    name = model.yaml["backbone"][0][2]
    source = BACKBONES.get(name).source if name in BACKBONES else None
    record = {"name": name, "plugin": Path(source).name if source else None}
    if hasattr(node, "export_options"):
        record.update(node.export_options())
    return record


def check_backbone_available(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse, with what to do, a checkpoint whose backbone this process cannot rebuild: a plugin
    backbone whose plugin is not loaded, or a timm model the installed timm does not have."""
    from models.backbones import BACKBONES

    record = ckpt.get("backbone") or {}
    name = record.get("name")
    if name and name not in BACKBONES and record.get("plugin"):
        raise ValueError(f"{path}: its backbone {name} comes from the plugin {record['plugin']}, which is "
                         f"not loaded; pass --plugin path/to/{record['plugin']} (Python: Detector(..., "
                         f"plugins=['{record['plugin']}']))")
    timm_model = record.get("timm_model")
    if timm_model:
        from models.backbones.timm_node import Timm, timm_version

        if timm_model not in Timm.variants:
            raise ValueError(f"{path}: its backbone is the timm model {timm_model} (saved with timm "
                             f"{record.get('timm_version')}), which the installed timm {timm_version()} "
                             "does not have; install a timm version that has it")


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
    check_backbone_available(ckpt, path)
    model = DetectionModel(plain_yaml(ckpt["yaml"]))
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    model.names = list(ckpt.get("names") or model.names)
    model.hyp = ckpt.get("hyp") or {}
    model = model.to(device).eval()
    return model.fuse() if fuse else model
