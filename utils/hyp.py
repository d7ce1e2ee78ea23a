"""Hyperparameters (configs/hyps/*.yaml): every key, its type and its range checked before a run starts.

    from utils.hyp import check_hyp
    hyp = check_hyp(yaml_load(path), str(path))   # one ValueError naming every problem, file and key

YOLOv5 reads each hyp key where it uses it, so a missing key surfaces late (`KeyError: 'lr0'` when
the optimiser is built), a string only where it is used (`mosaic: "yes"` in the first batch, inside
a DataLoader worker), and a misspelt key or an impossible value (`fliplr: 7`) is silently accepted.
Here one table, HYP_RULES, states every key this project reads (YOLOv5's, plus optional ones for the
ViT backbones), and `check_hyp` applies it to the whole mapping at once.

PyYAML follows YAML 1.1, where a float needs a dot: `weight_decay: 5e-4` is read as the string
'5e-4'. For numeric keys, strings that parse as a float are accepted and converted.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

INF = math.inf
# `close_mosaic: N` trains the last N epochs on single letterboxed images (Ultralytics' default is 10).
# Measured on BCCD (yolov5n, anchor-based Detect, 50 epochs, docs/training.md) it cost mAP50-95 (0.469 vs
# 0.489 with mosaic to the end), so hyp files without the key keep mosaic to the end.
CLOSE_MOSAIC_EPOCHS = 0


@dataclass(frozen=True)
class HypRule:
    """What one hyperparameter means and which values it may take (an interval of numbers)."""

    meaning: str
    low: float = 0.0
    high: float = INF
    low_open: bool = False  # True: `low` itself is not allowed
    high_open: bool = False
    required: bool = True
    integer: bool = False  # rounded to an int (engine/evolve.py mutates it as a float; YOLOv5 rounds it)
    default: float | None = None  # filled in when an optional key is absent (code reads it)

    def allows(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def range_text(self) -> str:
        """'in [0, 1]', 'in (0, 1]', '> 0', '>= 0'."""
        if self.high == INF:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


def _probability(meaning: str) -> HypRule:
    return HypRule(meaning, 0, 1)


def _gain(meaning: str, **options) -> HypRule:
    return HypRule(meaning, 0, INF, **options)


def _positive(meaning: str, **options) -> HypRule:
    return HypRule(meaning, 0, INF, low_open=True, **options)


HYP_RULES: dict[str, HypRule] = {
    "lr0": _positive("initial learning rate"),
    "lrf": HypRule("final learning rate as a fraction of lr0", 0, 1, low_open=True),
    "momentum": HypRule("SGD momentum / Adam beta1", 0, 1, high_open=True),
    "weight_decay": _gain("optimizer weight decay"),
    "warmup_epochs": _gain("warmup epochs (fractions ok)"),
    "warmup_momentum": HypRule("warmup initial momentum", 0, 1, high_open=True),
    "warmup_bias_lr": _gain("warmup initial bias learning rate"),
    "box": _gain("box loss gain"),
    "cls": _gain("cls loss gain"),
    "cls_pw": _positive("cls BCELoss positive weight"),
    "obj": _gain("obj loss gain"),
    "obj_pw": _positive("obj BCELoss positive weight"),
    "iou_t": HypRule("IoU training threshold (YOLOv5 files carry it; nothing reads it)", 0, 1,
                     low_open=True, required=False),
    "anchor_t": HypRule("anchor-multiple threshold", 1, INF, low_open=True),
    "anchors": _gain("anchors per output layer (0 to ignore)", required=False, integer=True),
    "fl_gamma": _gain("focal loss gamma (0: plain BCE)", required=False, default=0.0),
    "hsv_h": _probability("HSV-Hue augmentation (fraction)"),
    "hsv_s": _probability("HSV-Saturation augmentation (fraction)"),
    "hsv_v": _probability("HSV-Value augmentation (fraction)"),
    "degrees": HypRule("rotation (+/- degrees)", 0, 180),
    "translate": _probability("translation (+/- fraction)"),
    "scale": HypRule("scale (+/- gain; 1 would allow zero-size images)", 0, 1, high_open=True),
    "shear": HypRule("shear (+/- degrees)", 0, 90, high_open=True),
    "perspective": HypRule("perspective (+/- fraction)", 0, 0.001),
    "flipud": _probability("flip up-down probability"),
    "fliplr": _probability("flip left-right probability"),
    "mosaic": _probability("mosaic probability"),
    "mixup": _probability("mixup probability"),
    "copy_paste": _probability("segment copy-paste probability"),
    # anchor-free head DetectAF (optional; utils/loss_af.py uses its defaults 7.5, 0.5, 1.5, 10 without them)
    "af_box": _gain("DetectAF CIoU box loss gain (not rescaled; default 7.5)", required=False),
    "af_cls": _gain("DetectAF BCE class loss gain (not rescaled; default 0.5)", required=False),
    "af_dfl": _gain("DetectAF distribution focal loss gain (default 1.5)", required=False),
    "af_topk": HypRule("DetectAF task-aligned assigner: anchors per box (default 10)", 1, 100, required=False,
                       integer=True),
    "af_min_side": HypRule("DetectAF assigner: box sides below this many smallest strides are grown to it "
                           "when picking the anchors inside a box (default 0: off)", 0, 16, required=False),
    "af_box_score_power": HypRule("DetectAF box and DFL loss weight of a positive = its target score ** this "
                                  "(default 0: every positive the same; YOLOv8: 1)", 0, 4, required=False),
    "close_mosaic": _gain("last epochs trained without mosaic (0: mosaic to the end)", required=False,
                          integer=True, default=CLOSE_MOSAIC_EPOCHS),
    # ViT backbones (optional; read by the optimiser and the backbone builders when present)
    "backbone_lr_mult": _positive("backbone learning-rate multiplier", required=False),
    "layer_decay": HypRule("layer-wise learning-rate decay", 0, 1, low_open=True, required=False),
    "drop_path": HypRule("stochastic depth rate", 0, 1, high_open=True, required=False),
}
NOT_HYP_KEYS = {  # keys people put in hyp files that live elsewhere here
    "label_smoothing": "a train.py flag (--label-smoothing), not a hyperparameter",
}


class HypError(ValueError, KeyError):
    """Hyperparameters that cannot be used. A ValueError; also a KeyError because a missing key
    raised KeyError before this check existed, and callers catching that keep working."""

    __str__ = BaseException.__str__  # KeyError's own would print the message as a quoted repr


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _number(value: Any, rule: HypRule) -> tuple[float | int | None, str | None]:
    """(value as a Python float, or rounded to an int for integer keys, None) or (None, what is wrong)."""
    if value is None:
        return None, "has no value"
    if isinstance(value, bool):  # a bool is an int to Python; YAML 1.1 reads yes/no/on/off as one
        return None, f"{value} is not a number (YAML reads yes/no/on/off/true/false as booleans)"
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None, f"{value!r} is not a number"
    elif isinstance(value, numbers.Real):
        number = float(value)  # numpy scalars too: checkpoints must load with weights_only=True
    else:
        return None, f"{_shown(value)} is not a number (a {type(value).__name__})"
    if not math.isfinite(number):
        return None, f"{_shown(value)} is not a finite number"
    return (round(number) if rule.integer else number), None


def _unknown_key(key: Any) -> str:
    name = str(key)
    if name in NOT_HYP_KEYS:
        return f"unknown key ({NOT_HYP_KEYS[name]})"
    close = difflib.get_close_matches(name.lower(), list(HYP_RULES), n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return "unknown key (not a hyperparameter this project reads; see configs/hyps/hyp.scratch-low.yaml)"


def _missing(key: str) -> str:
    rule = HYP_RULES.get(key)
    return f"missing ({rule.meaning}, {rule.range_text()})" if rule else "missing"


def _check_value(key: str, value: Any) -> tuple[Any, str | None]:
    """(clean value, None) or (None, what is wrong with it) for a known key."""
    rule = HYP_RULES[key]
    number, problem = _number(value, rule)
    if problem is not None:
        return None, f"{problem} ({rule.meaning}, {rule.range_text()})"
    if not rule.allows(number):
        return None, f"{_shown(value)} is not {rule.range_text()} ({rule.meaning})"
    return number, None


def check_hyp(hyp: Mapping[str, Any], source: str, required: Iterable[str] | None = None) -> dict[str, Any]:
    """Check a whole hyperparameter mapping against HYP_RULES before anything uses it.

    source: where the values came from (the YAML path, 'checkpoint x.pt', ...), named in the message.
    required: the keys that must be present (default: every key the trainer reads; the dataset asks
    only for the augmentation keys); keys that are present are checked all the same.
    Returns a new dict: numbers as Python floats (`anchors` rounded to an int), numeric strings ('5e-4')
    converted, absent optional keys with a default filled in (fl_gamma: 0.0). Raises HypError (a
    ValueError) listing every problem, one line each: '<source>: <key>: <problem>'.
    """
    if not isinstance(hyp, Mapping):
        raise HypError(f"{source}: hyperparameters must be a mapping of key: value, got {type(hyp).__name__}")
    needed = [k for k, r in HYP_RULES.items() if r.required] if required is None else list(required)
    problems = [(key, _missing(key)) for key in needed if key not in hyp]
    clean: dict[str, Any] = {}
    for key, value in hyp.items():
        if key not in HYP_RULES:
            problems.append((key, _unknown_key(key)))
            continue
        clean[key], problem = _check_value(key, value)
        if problem:
            problems.append((key, problem))
    if problems:
        lines = "\n".join(f"  {source}: {key}: {problem}" for key, problem in problems)
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise HypError(f"{source}: {count} in the hyperparameters (see configs/hyps/ for the keys):\n{lines}")
    for key, rule in HYP_RULES.items():
        if key not in clean and rule.default is not None:
            clean[key] = rule.default
    return clean
