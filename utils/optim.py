"""Optimiser, learning-rate schedule, warmup, EMA and gradient clipping, with YOLOv5's semantics.

The trainer uses these pieces in this order each batch (YOLOv5's train.py):

    accumulate = warmup_step(optimizer, ni, nw, epoch, lf, hyp, nbs, batch_size)   # while ni <= nw
    loss.backward()
    every `accumulate` batches: unscale, clip_gradients(model), step, zero_grad, ema.update(model)
    once per epoch: scheduler.step()      # scheduler = LambdaLR(optimizer, lr_lambda(epochs, lrf, cos))

Parameter groups keep YOLOv5's order, because warmup treats group 0 differently:
    group 0: biases                          (no weight decay; warmup lr starts at warmup_bias_lr)
    group 1: weights that decay              (conv / linear kernels)
    group 2: weights that must not decay     (norm weights, layer scales, attention-bias tables,
                                              position encodings, names from `no_weight_decay()`)

Per-parameter learning-rate multipliers (`lr_scales`, from the hyp keys `backbone_lr_mult` and
`layer_decay`, see engine/weights.py) split each of the three kinds further by multiplier: the groups
are ordered by kind, then by falling multiplier, so group 0 is still the full-lr biases. Every group
carries `kind` ('bias', 'decay', 'no_decay') and `lr_scale`; its lr is lr0 * lr_scale. The scale
survives the schedule because LambdaLR scales each group's own `initial_lr` (= lr0 * lr_scale), and
the warmup, which sets every group's lr explicitly, ramps to initial_lr * lf(epoch) and starts bias
groups at warmup_bias_lr * lr_scale. Both keys are in the optimizer's state_dict, so a resumed run
has them back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger(f"vitdet.{__name__}")

OPTIMIZERS = ("SGD", "Adam", "AdamW")
AUTO = "auto"  # --optimizer auto (the default): `choose_optimizer` picks one of OPTIMIZERS for the schedule

# --optimizer auto: schedules with more optimiser steps than this train with YOLOv5's SGD recipe (the hyp
# file's lr0 and momentum), shorter ones with AdamW at a learning rate scaled to the number of classes.
# Ultralytics' rule and threshold: short schedules on small datasets (BCCD, 50 epochs: 200 steps) learn far
# more with AdamW (docs/training.md has the measurements); COCO-size schedules (300 epochs of 118k images:
# 550k steps) are where YOLOv5's SGD recipe was tuned.
AUTO_SGD_MIN_STEPS = 10_000

# Substrings of parameter names that never decay, whatever module holds them (timm's conventions and
# the names our backbones use). A safety net for modules that do not declare `no_weight_decay()`.
NO_DECAY_NAME_PARTS = ("layer_scale", "attention_biases", "pos_embed", "rel_pos")

# Every normalisation layer torch ships (BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm, LayerNorm,
# InstanceNorm*, LocalResponseNorm, RMSNorm, lazy variants, ...), found by name as YOLOv5 does.
TORCH_NORM_TYPES = tuple(
    cls
    for name, cls in vars(nn).items()
    if "Norm" in name and isinstance(cls, type) and issubclass(cls, nn.Module)
)


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside a DataParallel / DistributedDataParallel wrapper (or the model itself)."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, parallel) else model


# --------------------------------------------------------------------------------------------------
# Parameter groups and the optimiser
# --------------------------------------------------------------------------------------------------


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch's norm layers and for custom ones whose class name says Norm (LayerNorm2d,
    GroupNorm1, ...) as long as they hold only vectors (a real norm never holds a kernel)."""
    if isinstance(module, TORCH_NORM_TYPES):
        return True
    if "Norm" not in type(module).__name__:
        return False
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.ndim <= 1 for p in own)


def declared_no_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names excluded by any submodule's `no_weight_decay()` (names relative to it).

    An entry may name a parameter ('pos_embed') or a submodule ('blocks.0.attn'); both are honoured.
    """
    param_names = [name for name, _ in model.named_parameters()]
    excluded: set[str] = set()
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if not callable(declare):
            continue
        for entry in declare():
            full = f"{prefix}.{entry}" if prefix else str(entry)
            excluded.update(n for n in param_names if n == full or n.startswith(full + "."))
    return excluded


def split_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{'bias': [...], 'decay': [...], 'no_decay': [...]}: every parameter exactly once.

    Frozen parameters are included, as YOLOv5 does: they get no gradient, so the optimiser skips them.

    bias:      parameters named `bias` (YOLOv5's g2)
    no_decay:  norm weights, layer scales, attention-bias tables, position encodings and names
               declared by `no_weight_decay()` (YOLOv5's g1, extended for transformers)
    decay:     everything else: conv and linear kernels (YOLOv5's g0)
    """
    declared = declared_no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"bias": [], "decay": [], "no_decay": []}
    seen: set[int] = set()  # shared (tied) parameters go in once
    for module_name, module in model.named_modules():
        norm = is_norm_layer(module)
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            groups[_group_of(full, param_name, norm, declared)].append(param)
    return groups


def _group_of(full_name: str, param_name: str, in_norm: bool, declared: set[str]) -> str:
    if param_name == "bias":
        return "bias"
    if in_norm or full_name in declared or any(part in full_name for part in NO_DECAY_NAME_PARTS):
        return "no_decay"
    return "decay"


GROUP_KINDS = ("bias", "decay", "no_decay")


@dataclasses.dataclass(frozen=True)
class OptimizerChoice:
    """The optimiser a run uses and the hyp values that go with it (lr0, momentum, warmup_bias_lr)."""

    name: str
    lr0: float
    momentum: float
    warmup_bias_lr: float
    reason: str  # one line for the log: why these values
    HYP_KEYS: ClassVar[tuple[str, ...]] = ("lr0", "momentum", "warmup_bias_lr")  # the values it sets

    def apply_to(self, hyp: dict[str, Any]) -> None:
        """Write the chosen values into the run's hyperparameters (checkpoints keep them, so a resume
        rebuilds the same optimiser)."""
        hyp.update(lr0=self.lr0, momentum=self.momentum, warmup_bias_lr=self.warmup_bias_lr)


def optimizer_steps(n_images: int, batch_size: int, epochs: int, nbs: int = 64) -> int:
    """Optimiser steps of a schedule: gradients accumulate to at least `nbs` images per step."""
    return math.ceil(n_images / max(batch_size, nbs)) * epochs


def choose_optimizer(name: str, hyp: Mapping[str, Any], n_images: int, batch_size: int, epochs: int,
                     nc: int, nbs: int = 64) -> OptimizerChoice:
    """The optimiser for `--optimizer name`: an explicit name keeps the hyp file's lr0 and momentum; 'auto'
    picks SGD with them for schedules of more than AUTO_SGD_MIN_STEPS optimiser steps, else AdamW with
    lr0 = 0.002 * 5 / (4 + nc), beta1 0.9 and no bias warmup (Ultralytics' rule for short schedules)."""
    keep = OptimizerChoice(name, float(hyp["lr0"]), float(hyp["momentum"]), float(hyp["warmup_bias_lr"]),
                           "as requested, lr0 and momentum from the hyperparameters")
    if name != AUTO:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join((AUTO, *OPTIMIZERS))}")
        return keep
    steps = optimizer_steps(n_images, batch_size, epochs, nbs)
    if steps > AUTO_SGD_MIN_STEPS:
        return dataclasses.replace(keep, name="SGD", reason=f"auto: {steps} optimizer steps > "
                                   f"{AUTO_SGD_MIN_STEPS}: SGD with the hyperparameters' lr0 and momentum")
    lr0 = round(0.002 * 5 / (4 + nc), 6)
    return OptimizerChoice("AdamW", lr0, 0.9, 0.0, f"auto: {steps} optimizer steps <= {AUTO_SGD_MIN_STEPS}: "
                           f"AdamW with lr0 = 0.002 * 5 / (4 + nc={nc}) = {lr0}, momentum 0.9, warmup_bias_lr 0 "
                           "(--optimizer SGD/Adam/AdamW keeps the hyp file's values)")


def smart_optimizer(
    model: nn.Module, name: str = "SGD", lr: float = 0.001, momentum: float = 0.9, decay: float = 1e-5,
    lr_scales: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """YOLOv5's optimiser with three parameter groups (see the module docstring for their order).

    SGD uses Nesterov momentum; Adam and AdamW use betas=(momentum, 0.999). Only the 'decay' groups get
    `decay` (AdamW's built-in decay is set to 0 on the others, as YOLOv5 does).
    lr_scales: {parameter name: lr multiplier}; names not listed get 1. With multipliers other than 1
    each kind is split by multiplier (empty groups are left out) and every group is logged with its lr.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = split_parameter_groups(model)
    specs = _scaled_groups(model, groups, lr_scales or {})
    for spec in specs:
        spec["lr"], spec["weight_decay"] = lr * spec["lr_scale"], decay if spec["kind"] == "decay" else 0.0
    if name == "SGD":
        optimizer = torch.optim.SGD(specs, lr=lr, momentum=momentum, nesterov=True)
    elif name == "Adam":
        optimizer = torch.optim.Adam(specs, lr=lr, betas=(momentum, 0.999))
    else:
        optimizer = torch.optim.AdamW(specs, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    LOGGER.info(
        f"optimizer: {name}(lr={lr}) with parameter groups {len(groups['no_decay'])} weight(decay=0.0), "
        f"{len(groups['decay'])} weight(decay={decay}), {len(groups['bias'])} bias"
    )
    if len(optimizer.param_groups) > len(GROUP_KINDS):
        for i, group in enumerate(optimizer.param_groups):
            LOGGER.info(f"  group {i:2d}: {group['kind']:8s} {len(group['params']):4d} tensors  "
                        f"lr={group['lr']:.3g} (x{group['lr_scale']:.4g})  "
                        f"weight_decay={group['weight_decay']:g}")
    return optimizer


def _scaled_groups(model: nn.Module, groups: dict[str, list[nn.Parameter]],
                   lr_scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """Group specs (params, kind, lr_scale) in kind order, then by falling multiplier."""
    names = {id(p): n for n, p in model.named_parameters()}
    unknown = set(lr_scales) - set(names.values())
    if unknown:
        raise KeyError(f"lr_scales names parameters the model does not have: {sorted(unknown)[:5]}")
    if all(float(v) == 1.0 for v in lr_scales.values()):  # YOLOv5's three groups, even when empty
        return [{"params": groups[kind], "kind": kind, "lr_scale": 1.0} for kind in GROUP_KINDS]
    specs = []
    for kind in GROUP_KINDS:
        by_scale: dict[float, list[nn.Parameter]] = {}
        for param in groups[kind]:
            by_scale.setdefault(float(lr_scales.get(names[id(param)], 1.0)), []).append(param)
        specs += [{"params": by_scale[scale], "kind": kind, "lr_scale": scale}
                  for scale in sorted(by_scale, reverse=True)]
    return specs


def scale_weight_decay(weight_decay: float, batch_size: int, nbs: int = 64) -> float:
    """Weight decay for a real batch: YOLOv5 scales it by batch_size * accumulate / nbs."""
    accumulate = max(round(nbs / batch_size), 1)
    return weight_decay * batch_size * accumulate / nbs


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule and warmup
# --------------------------------------------------------------------------------------------------


class LRFactor:
    """Epoch -> lr multiplier for `torch.optim.lr_scheduler.LambdaLR`.

    A callable object rather than a closure, so LambdaLR saves its three numbers in its state_dict
    (a plain dict, loadable with weights_only=True) and a resumed run rebuilds the same schedule.
    """

    def __init__(self, epochs: int, lrf: float, cos: bool = False):
        if epochs <= 0:
            raise ValueError(f"lr schedule needs epochs > 0, got {epochs}")
        self.epochs, self.lrf, self.cos = int(epochs), float(lrf), bool(cos)

    def __call__(self, epoch: float) -> float:
        if self.cos:  # one-cycle cosine from 1 down to lrf
            return ((1 - math.cos(epoch * math.pi / self.epochs)) / 2) * (self.lrf - 1) + 1
        return (1 - epoch / self.epochs) * (1.0 - self.lrf) + self.lrf

    def __repr__(self) -> str:
        return f"LRFactor(epochs={self.epochs}, lrf={self.lrf}, cos={self.cos})"


def lr_lambda(epochs: int, lrf: float, cos: bool = False) -> Callable[[float], float]:
    """Linear `(1 - x/epochs) * (1 - lrf) + lrf` or cosine `((1 - cos(x*pi/epochs)) / 2) * (lrf - 1) + 1`.

    Both give 1 at epoch 0 and lrf at epoch `epochs`.
    """
    return LRFactor(epochs, lrf, cos)


def warmup_iterations(hyp: Mapping[str, Any], batches_per_epoch: int) -> int:
    """YOLOv5's warmup length: max(round(warmup_epochs * batches_per_epoch), 100) iterations."""
    return max(round(float(hyp["warmup_epochs"]) * batches_per_epoch), 100)


def warmup_step(
    optimizer: torch.optim.Optimizer,
    ni: int,
    nw: int,
    epoch: int,
    lf: Callable[[float], float],
    hyp: Mapping[str, Any],
    nbs: int,
    batch_size: int,
) -> int:
    """Warm up learning rates and momentum at iteration `ni` of `nw`; returns the accumulate count.

    Between ni=0 and ni=nw each quantity moves linearly (np.interp, as YOLOv5):
      bias groups lr:       warmup_bias_lr * lr_scale -> initial_lr * lf(epoch)
      other groups lr:      0                         -> initial_lr * lf(epoch)
      momentum (SGD):       warmup_momentum -> momentum
      accumulate:           1              -> nbs / batch_size (rounded, at least 1)
    Past the warmup (ni > nw) nothing is changed and the full accumulate count is returned.
    Groups need `initial_lr`, which LambdaLR sets when it is built; `initial_lr` already holds the
    group's lr multiplier. A group without `kind` (an optimiser built elsewhere) is a bias group when
    it is group 0, as in YOLOv5.
    """
    full_accumulate = max(round(nbs / batch_size), 1)
    if ni > nw:
        return full_accumulate
    if nw <= 0:
        raise ValueError(f"warmup needs nw > 0 iterations, got {nw}")
    span = [0, nw]
    accumulate = max(1, int(np.interp(ni, span, [1, nbs / batch_size]).round()))
    for index, group in enumerate(optimizer.param_groups):
        if "initial_lr" not in group:
            raise KeyError(f"optimizer group {index} has no 'initial_lr': build the LambdaLR scheduler first")
        is_bias = group.get("kind", "bias" if index == 0 else "") == "bias"
        start_lr = float(hyp["warmup_bias_lr"]) * float(group.get("lr_scale", 1.0)) if is_bias else 0.0
        # float(): numpy scalars in the optimizer state would not load with weights_only=True
        group["lr"] = float(np.interp(ni, span, [start_lr, group["initial_lr"] * lf(epoch)]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(ni, span, [hyp["warmup_momentum"], hyp["momentum"]]))
    return accumulate


def clip_gradients(model: nn.Module, max_norm: float = 10.0) -> torch.Tensor:
    """Clip the global gradient norm of `model` to `max_norm` (YOLOv5: 10); returns the norm before."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)


# --------------------------------------------------------------------------------------------------
# Exponential moving average of the weights
# --------------------------------------------------------------------------------------------------


class ModelEMA:
    """YOLOv5's Model Exponential Moving Average (https://github.com/rwightman/pytorch-image-models).

    Keeps `ema`, a deep copy of the bare model in eval mode without gradients. Each `update` moves
    its floating-point state towards the model's by `1 - d` with d = decay * (1 - exp(-updates / tau)),
    so early updates follow the model closely and later ones average over ~1/(1-decay) steps.
    Integer buffers (BatchNorm's num_batches_tracked) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.decay_max, self.tau, self.updates = float(decay), float(tau), int(updates)
        for param in self.ema.parameters():
            param.requires_grad_(False)

    def decay(self, updates: int) -> float:
        """The averaging weight kept from the EMA after `updates` updates."""
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model` (which may be DDP-wrapped)."""
        self.updates += 1
        d = self.decay(self.updates)
        model_state = de_parallel(model).state_dict()
        for key, ema_value in self.ema.state_dict().items():
            value = model_state[key].detach()
            if ema_value.dtype.is_floating_point:
                ema_value *= d
                ema_value += (1 - d) * value.to(ema_value.dtype)
            else:
                ema_value.copy_(value)

    def update_attr(
        self,
        model: nn.Module,
        include: Iterable[str] = ("yaml", "nc", "hyp", "names", "stride"),
        exclude: Iterable[str] = ("process_group", "reducer"),
    ) -> None:
        """Copy the listed plain attributes of the bare model onto the EMA (names that exist only)."""
        source = de_parallel(model)
        excluded = set(exclude)
        for name in include:
            if name in excluded or name.startswith("_") or not hasattr(source, name):
                continue
            setattr(self.ema, name, getattr(source, name))

    def state_dict(self) -> dict[str, Any]:
        """{'model': EMA weights, 'updates', 'decay', 'tau'}: tensors and numbers only."""
        return {
            "model": self.ema.state_dict(),
            "updates": self.updates,
            "decay": self.decay_max,
            "tau": self.tau,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (exact: same weights, same position on the decay ramp)."""
        missing = [k for k in ("model", "updates") if k not in state]
        if missing:
            raise KeyError(f"EMA state is missing {missing}; it has {sorted(state)}")
        self.ema.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self.decay_max = float(state.get("decay", self.decay_max))
        self.tau = float(state.get("tau", self.tau))
