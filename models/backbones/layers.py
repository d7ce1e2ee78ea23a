"""Layers shared by every backbone family and by the detection model's `fuse()`.

- `IMAGENET_MEAN`, `IMAGENET_STD`: the input statistics the released weights were trained with.
- `fold_batch_norm`, `fuse_conv_bn`: the one Conv+BN fold (float64 arithmetic, result in the
  conv's dtype), used by `ConvBN`, by YOLOv5's `Conv` and by the FastViT branch folds.
- `ConvBN`: Conv2d (no bias) -> BatchNorm2d -> optional activation, with `reparameterize()`.
- `DropPath` and `drop_path_rates`: stochastic depth and its one rate schedule (linear over all
  blocks of the full model, as timm).
- `Reparameterizable` and `reparameterize_modules`: the fuse walker. A module that has a folded
  inference form implements `reparameterize()` (in place, exact in eval mode, idempotent); the walker
  calls it on every outermost such module below a root. `Backbone.reparameterize()` and
  `DetectionModel.fuse()` are both this walk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, inputs in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Conv + BatchNorm
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None,
                    bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight', bias') of the one conv equal to `bn(conv(x))` in eval mode (running statistics).

    weight (out, in / groups, k, k) and bias (out,) or None are the conv's. w' = w * s and
    b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps). The arithmetic runs in float64 and
    the results are cast back to weight's dtype, so a float32 fold is exact to float32 rounding and a
    bfloat16 model loses nothing in the product.
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bias.double() if bias is not None else torch.zeros_like(scale)
    folded_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_bias = (shift - bn.running_mean.double()) * scale + bn.bias.double()
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new biased Conv2d with `conv`'s geometry equal to `bn(conv(x))` in eval mode.

    It lives on conv's device in conv's dtype; its parameters train when conv's weight does (a fold
    must not freeze a model that is fine-tuned after `fuse()`).
    """
    weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused.requires_grad_(conv.weight.requires_grad)


class ConvBN(nn.Module):
    """Conv2d without bias -> BatchNorm2d -> activation (Identity when None); 'same' padding k // 2.

    (B, in_channels, H, W) -> (B, out_channels, ceil(H / stride), ceil(W / stride)) for odd kernels.
    `bn_weight_init` 0 makes a residual branch start as the identity (EfficientViT and LeViT recipes).
    `reparameterize()` replaces conv + bn by one biased conv (bn becomes Identity); idempotent.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, activation: nn.Module | None = None, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                              groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_channels)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)
        self.act = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @property
    def is_reparameterized(self) -> bool:
        return not isinstance(self.bn, nn.BatchNorm2d)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if not self.is_reparameterized:
            self.conv = fuse_conv_bn(self.conv, self.bn)
            self.bn = nn.Identity()


# ---------------------------------------------------------------------------------------------
# Stochastic depth
# ---------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `rate` in training.

    The branch is multiplied by a 0/1 mask (scaled by 1 / (1 - rate)) rather than skipped, so a
    dropped branch still takes part in the graph and every parameter receives a gradient (DDP).
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = check_drop_path_rate(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def check_drop_path_rate(rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    return float(rate)


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per-stage lists of block rates, rising linearly from 0 (first block) to `rate` (last block).

    `depths` are the block counts of every stage of the full model, built or not, so a backbone
    truncated for detection keeps the rates of the full one (timm's schedule).
    """
    check_drop_path_rate(rate)
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    schedule, start = [], 0
    for depth in depths:
        schedule.append(flat[start:start + depth])
        start += depth
    return schedule


# ---------------------------------------------------------------------------------------------
# The fuse walker
# ---------------------------------------------------------------------------------------------

@runtime_checkable
class Reparameterizable(Protocol):
    """A module with a folded inference form: `reparameterize()` is in place, exact for eval-mode
    outputs and a no-op the second time. It folds its whole subtree (the walker does not descend).
    By convention it also tells `is_reparameterized` (ConvBN, backbones, FastViT and RIFormer blocks)."""

    def reparameterize(self) -> None: ...


def reparameterize_modules(root: nn.Module) -> None:
    """Fold every outermost `Reparameterizable` strictly below `root`, in place.

    A backbone is itself reparameterizable, so walking a detection model folds the neck's Conv+BN
    pairs and hands each backbone to its own `reparameterize()`.
    """
    for child in list(root.children()):  # a fold swaps submodules: never mutate a live iterator
        if isinstance(child, Reparameterizable):
            child.reparameterize()
        else:
            reparameterize_modules(child)
