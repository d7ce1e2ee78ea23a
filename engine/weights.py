"""The starting weights of a training run: tensors transferred from a checkpoint, and frozen layers."""

from __future__ import annotations

import logging

from models.backbones import Backbone, LoadReport
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


# -- pretrained backbone weights (--backbone-weights) ---------------------------------------------------

def backbone_node(model: DetectionModel) -> Backbone | None:
    """The swappable backbone of `model` (layer 0), or None for a YAML-rows backbone (YOLOv5's CSP)."""
    first = model.model[0]
    return first if isinstance(first, Backbone) else None


def load_backbone_weights(model: DetectionModel, path: str, partial: bool = False) -> LoadReport:
    """Load an official release or a timm state_dict into the backbone node of `model` (--backbone-weights).

    The backbone family reads the file (`Backbone.load_pretrained`: the format is told by its key names),
    and the report is logged: tensors loaded, head keys ignored, tables resized, and whatever is missing,
    unexpected or of another shape. An incomplete load (a file of another variant or family) raises
    with the first offending tensor names, unless `partial` (--backbone-weights-partial): then the
    matching tensors are kept, the rest stay as initialised and a warning says so. A file from which
    nothing at all loads is an error either way.
    """
    backbone = backbone_node(model)
    if backbone is None:
        raise ValueError(f"--backbone-weights {path}: the model has no backbone node (a row such as "
                         "[-1, 1, FastViT, [sa12]]); its backbone is built from YAML rows, which have no "
                         "release files. Use --weights with one of our checkpoints instead")
    report = backbone.load_pretrained(path)
    LOGGER.info(f"backbone weights {backbone.display_name}: {report.summary()}")
    if report.ignored:
        LOGGER.info(f"  ignored (classifier head, index buffers, unbuilt stages): {_shown(report.ignored)}")
    if not report.loaded:
        raise RuntimeError(f"--backbone-weights {path}: no tensor of the file fits {backbone.display_name}. "
                           f"{report.summary()}")
    if not report.complete:
        if not partial:
            raise RuntimeError(f"--backbone-weights {path} does not fit {backbone.display_name} (another "
                               f"variant or family?). {report.summary()}. Pass --backbone-weights-partial to "
                               "keep the tensors that fit")
        LOGGER.warning(f"--backbone-weights-partial: {len(report.missing)} backbone tensors keep their "
                       f"initialisation: {_shown(report.missing)}")
    return report


def _shown(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# -- fine-tuning hyperparameters -------------------------------------------------------------------------

def backbone_parameter_depths(model: DetectionModel) -> tuple[dict[str, int], int]:
    """({full parameter name: depth index}, N) over the backbone of `model` for layer-wise lr decay.

    A backbone node uses `Backbone.layer_depths()` (stem 0, blocks 1..N-1). A YAML-rows backbone counts
    its rows: row r of R gets index r, N = R. Neck and head parameters are not listed (index N).
    """
    backbone = backbone_node(model)
    if backbone is not None:
        depths, total = backbone.layer_depths()
        return {f"model.0.{name}": depth for name, depth in depths.items()}, total
    rows = len(model.yaml["backbone"])
    depths = {}
    for name, _ in model.named_parameters():
        layer = int(name.split(".")[1])
        if layer < rows:
            depths[name] = layer
    return depths, rows


def parameter_lr_scales(model: DetectionModel, backbone_lr_mult: float = 1.0,
                        layer_decay: float = 1.0) -> dict[str, float]:
    """{parameter name: lr multiplier} for the backbone (hyp keys `backbone_lr_mult` and `layer_decay`).

    A backbone parameter of depth index i of N (see `backbone_parameter_depths`) gets
    backbone_lr_mult * layer_decay ** (N - i), as in BEiT and ViTDet; neck and head keep 1 and are not
    listed, nor are the backbone's per-output norms (index N: no release holds them, they start fresh
    like the neck). With both keys at 1 the mapping is empty.
    """
    if backbone_lr_mult == 1.0 and layer_decay == 1.0:
        return {}
    depths, total = backbone_parameter_depths(model)
    return {name: float(backbone_lr_mult * layer_decay ** (total - depth))
            for name, depth in depths.items() if depth < total}


def model_config_with_drop_path(cfg, rate: float) -> dict:
    """The model YAML (path, name or dict) with the backbone node's stochastic-depth rate set to `rate`
    (hyp key `drop_path`; the family's own schedule over its blocks applies, rising to `rate`).

    A family without stochastic depth (EfficientViT) is an error naming it; a YAML-rows backbone has
    none either, so the key is ignored there with a warning.
    """
    import inspect

    from models.backbones import BACKBONES
    from models.yolo import load_model_config

    config = load_model_config(cfg)
    row = config["backbone"][0]
    name = row[2]
    if name not in BACKBONES:
        LOGGER.warning(f"hyp drop_path={rate}: the model's backbone is built from YAML rows without "
                       "stochastic depth; ignored")
        return config
    family = BACKBONES.get(name).cls
    if "drop_path_rate" not in inspect.signature(family.__init__).parameters:
        raise ValueError(f"hyp drop_path={rate}: backbone {name} ({family.__name__}) has no stochastic "
                         "depth; remove drop_path from the hyperparameters")
    args = list(row[3]) if len(row) > 3 else []
    options = dict(args[0]) if args and isinstance(args[0], dict) else ({"arch": args[0]} if args else {})
    options["drop_path_rate"] = float(rate)
    row[3] = [options]
    return config


def set_requires_grad(model: DetectionModel, names: list[str], value: bool) -> None:
    """Switch `requires_grad` of the named parameters (freeze / unfreeze in place; the optimiser keeps
    them in its groups either way, so nothing is rebuilt)."""
    wanted = set(names)
    for name, param in model.named_parameters():
        if name in wanted:
            param.requires_grad_(value)
