"""The starting weights of a training run: tensors transferred from a checkpoint, and frozen layers."""

from __future__ import annotations

import logging

from models.backbones import Backbone
from models.yolo import DetectionModel

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def transfer_weights(model: DetectionModel, ckpt: dict, exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    """Copy checkpoint tensors whose name and shape match into `model`; returns (transferred, total)."""
    source = ckpt.get("ema") or ckpt["model"]
    ours = model.state_dict()
    matched = {k: v for k, v in source.items()
               if k in ours and v.shape == ours[k].shape and not any(x in k for x in exclude)}
    model.load_state_dict(matched, strict=False)
    skipped = sorted(set(ours) - set(matched))
    if skipped:
        more = " ..." if len(skipped) > 8 else ""
        LOGGER.info(f"Not transferred ({len(skipped)}): {', '.join(skipped[:8])}{more}")
    return len(matched), len(ours)


def freeze_prefixes(model: DetectionModel, freeze: list[str] | list[int]) -> list[str]:
    """Parameter-name prefixes of the layers --freeze names: [N] = first N layers, [a, b, ...] = those
    layers, ['backbone'] = the backbone node (model.0) when the YAML has one, else the layers of the
    YAML's backbone section."""
    if freeze == ["backbone"]:
        if isinstance(model.model[0], Backbone):
            return ["model.0."]
        return [f"model.{i}." for i in range(len(model.yaml["backbone"]))]
    layers = range(int(freeze[0])) if len(freeze) == 1 else [int(x) for x in freeze]
    return [f"model.{i}." for i in layers]


def freeze_layers(model: DetectionModel, freeze: list[str] | list[int]) -> list[str]:
    """Freeze the parameters of the layers --freeze names (see freeze_prefixes); returns their names."""
    prefixes = freeze_prefixes(model, freeze)
    frozen = []
    for name, p in model.named_parameters():
        if any(name.startswith(x) for x in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    if frozen:
        more = " ..." if len(prefixes) > 4 else ""
        LOGGER.info(f"Froze {len(frozen)} parameter tensors ({', '.join(prefixes[:4])}{more})")
    return frozen
