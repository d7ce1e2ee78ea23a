"""Building blocks of FastViT (Vasu et al., ICCV 2023), each with its train-time and folded form.

Every reparameterisable block holds either its train-time branches or, after `reparameterize()`, a single
`fused_conv` (a plain `nn.Conv2d` with bias). Folding uses the BatchNorm running statistics, i.e. it is
exact for the block in eval mode. All tensors are NCHW feature maps; no block changes the spatial size
except the stride-2 convolutions, which give ceil(H / 2) x ceil(W / 2) ("same" padding k // 2).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DropPath, fold_batch_norm


def identity_kernel(channels: int, groups: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """The (channels, channels / groups, k, k) kernel of a grouped conv that returns its input."""
    in_per_group = channels // groups
    kernel = like.new_zeros(channels, in_per_group, kernel_size, kernel_size)
    index = torch.arange(channels, device=like.device)
    kernel[index, index % in_per_group, kernel_size // 2, kernel_size // 2] = 1
    return kernel


class ConvGeometry(NamedTuple):
    """Channels, stride and groups of a folded conv (its kernel size comes from the folded weight)."""

    in_channels: int
    out_channels: int
    stride: int = 1
    groups: int = 1


def new_fused_conv(geometry: ConvGeometry, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased 'same'-padded conv with `geometry` holding `weight` and `bias`."""
    conv = nn.Conv2d(geometry.in_channels, geometry.out_channels, weight.shape[-1], stride=geometry.stride,
                     padding=weight.shape[-1] // 2, groups=geometry.groups, bias=True)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


class FoldsIntoConv(nn.Module, metaclass=ABCMeta):
    """A multi-branch block whose inference form is one conv: `reparameterize()` sums the branches'
    folded kernels into `fused_conv` and drops the branches (in place, idempotent). The shared fuse
    walker (`layers.reparameterize_modules`) calls it; the block folds its children itself."""

    fused_conv: nn.Conv2d | None
    geometry: ConvGeometry  # of the folded conv

    @property
    def is_reparameterized(self) -> bool:
        return getattr(self, "fused_conv", None) is not None

    def reparameterize(self) -> None:
        if self.is_reparameterized:
            return
        with torch.no_grad():
            weight, bias = self.fused_kernel_bias()
        self.drop_branches()
        self.fused_conv = new_fused_conv(self.geometry, weight, bias)

    @abstractmethod
    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single conv equal to this block in eval mode."""

    @abstractmethod
    def drop_branches(self) -> None:
        """Remove the train-time branches (their names leave the state_dict)."""


class ConvBNBranch(nn.Sequential):
    """Bias-free conv then BatchNorm; 'same' padding, so stride s gives ceil(H / s).

    Not foldable on its own: the block that holds it sums its `fused_kernel_bias()` into one conv, and
    the ConvFFN's depthwise one stays unfolded, as in the official `_reparam` releases.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_batch_norm(self.conv.weight, None, self.bn)


class MobileOneBlock(FoldsIntoConv):
    """MobileOne block: sum of conv-BN branches, a 1x1 conv-BN "scale" branch (k > 1) and an identity BN
    (when the shape is kept), then GELU. Folds into one k x k conv (+ GELU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, conv_branches: int = 1, use_scale_branch: bool = True,
                 use_activation: bool = True) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.fused_conv = None
        self.conv_branches = nn.ModuleList(
            ConvBNBranch(in_channels, out_channels, kernel_size, stride, groups) for _ in range(conv_branches)
        ) if conv_branches > 0 else None
        self.scale_branch = ConvBNBranch(in_channels, out_channels, 1, stride, groups) \
            if kernel_size > 1 and use_scale_branch else None
        keeps_shape = in_channels == out_channels and stride == 1
        self.identity_bn = nn.BatchNorm2d(in_channels) if keeps_shape else None
        self.geometry = ConvGeometry(in_channels, out_channels, stride, groups)
        self.activation = nn.GELU() if use_activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_conv is not None:
            return self.activation(self.fused_conv(x))
        out = self.identity_bn(x) if self.identity_bn is not None else 0
        if self.scale_branch is not None:
            out = out + self.scale_branch(x)
        for branch in self.conv_branches or ():
            out = out + branch(x)
        return self.activation(out)

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        geometry = self.geometry
        like = next(self.parameters())
        in_per_group = geometry.in_channels // geometry.groups
        weight = like.new_zeros(geometry.out_channels, in_per_group, self.kernel_size, self.kernel_size)
        bias = like.new_zeros(geometry.out_channels)
        for branch in self.conv_branches or ():
            branch_weight, branch_bias = branch.fused_kernel_bias()
            weight, bias = weight + branch_weight, bias + branch_bias
        if self.scale_branch is not None:
            scale_weight, scale_bias = self.scale_branch.fused_kernel_bias()
            pad = self.kernel_size // 2
            weight, bias = weight + F.pad(scale_weight, [pad] * 4), bias + scale_bias
        if self.identity_bn is not None:
            eye = identity_kernel(geometry.in_channels, geometry.groups, self.kernel_size, like)
            skip_weight, skip_bias = fold_batch_norm(eye, None, self.identity_bn)
            weight, bias = weight + skip_weight, bias + skip_bias
        return weight, bias

    def drop_branches(self) -> None:
        self.conv_branches = None
        self.scale_branch = None
        self.identity_bn = None


class ReparamLargeKernelConv(FoldsIntoConv):
    """Depthwise(-multiplier) large-kernel conv-BN plus a 3x3 conv-BN, folded into one large kernel.

    No activation: the official block computes a GELU and discards it, and the released weights were
    trained that way, so none is applied here either (the output is linear in the input).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: int = 3) -> None:
        super().__init__()
        if small_kernel > kernel_size:
            raise ValueError(f"small kernel {small_kernel} is larger than the large kernel {kernel_size}")
        self.kernel_size = kernel_size
        self.fused_conv = None
        self.large = ConvBNBranch(in_channels, out_channels, kernel_size, stride, groups)
        self.small = ConvBNBranch(in_channels, out_channels, small_kernel, stride, groups)
        self.geometry = ConvGeometry(in_channels, out_channels, stride, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(x)
        return self.large(x) + self.small(x)

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.large.fused_kernel_bias()
        small_weight, small_bias = self.small.fused_kernel_bias()
        pad = (self.kernel_size - small_weight.shape[-1]) // 2
        return weight + F.pad(small_weight, [pad] * 4), bias + small_bias

    def drop_branches(self) -> None:
        self.large = None
        self.small = None


class PatchEmbed(nn.Module):
    """Downsampling between stages: 7x7 stride-2 reparameterisable conv (channel multiplier
    out/in) then a 1x1 MobileOne block. (B, in, H, W) -> (B, out, ceil(H/2), ceil(W/2))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7, stride: int = 2) -> None:
        super().__init__()
        self.large_kernel = ReparamLargeKernelConv(in_channels, out_channels, kernel_size, stride,
                                                   groups=in_channels)
        self.pointwise = MobileOneBlock(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.large_kernel(x))


class RepMixer(FoldsIntoConv):
    """Token mixing x + s * (DWConv-BN mix(x) - BN(x)); folds into one depthwise conv (identity included)."""

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.fused_conv = None
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, conv_branches=0, use_scale_branch=False,
                                   use_activation=False)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_activation=False)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.geometry = ConvGeometry(dim, dim, 1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        mixer_weight, mixer_bias = self.mixer.fused_kernel_bias()
        norm_weight, norm_bias = self.norm.fused_kernel_bias()
        eye = identity_kernel(mixer_weight.shape[0], mixer_weight.shape[0], self.kernel_size, mixer_weight)
        scale = self.layer_scale.reshape(-1)
        weight = eye + scale.reshape(-1, 1, 1, 1) * (mixer_weight - norm_weight)
        return weight, scale * (mixer_bias - norm_bias)

    def drop_branches(self) -> None:
        self.norm = None
        self.mixer = None
        self.layer_scale = None


class RepCPE(FoldsIntoConv):
    """Conditional position encoding x + DWConv7x7(x) (with bias); folds into one depthwise conv."""

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.fused_conv = None
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)
        self.geometry = ConvGeometry(dim, dim, 1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(x)
        return x + self.conv(x)

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.conv.weight
        eye = identity_kernel(weight.shape[0], self.conv.groups, self.kernel_size, weight)
        return eye + weight, self.conv.bias.clone()

    def drop_branches(self) -> None:
        self.conv = None


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv-BN, then 1x1 expand, GELU, 1x1 project (the FFN of every FastViT block)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.depthwise = ConvBNBranch(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        for conv in (self.depthwise.conv, self.fc1, self.fc2):  # the official initialisation
            nn.init.trunc_normal_(conv.weight, std=0.02)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.depthwise(x))))


class MHSA(nn.Module):
    """Global multi-head self-attention over all H*W positions; heads of 32 channels, no attention bias.

    (B, C, H, W) -> (B, C, H, W). Cost grows with (H*W)^2, so FastViT uses it only at stride 32.
    """

    def __init__(self, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"MHSA: dim {dim} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        for linear in (self.qkv, self.proj):  # the official initialisation
            nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(tokens).reshape(batch, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each (B, heads, N, head_dim)
        attn = ((query * self.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ value).transpose(1, 2).reshape(batch, -1, channels)
        return self.proj(out).transpose(1, 2).reshape(batch, channels, height, width)


class RepMixerBlock(nn.Module):
    """MetaFormer block with RepMixer: x = RepMixer(x); x = x + s * FFN(x)."""

    def __init__(self, dim: int, mlp_ratio: float, layer_scale_init: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, 3, layer_scale_init)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale * self.ffn(x))


class AttentionBlock(nn.Module):
    """MetaFormer block with MHSA: x = x + s1 * MHSA(BN(x)); x = x + s2 * FFN(x)."""

    def __init__(self, dim: int, mlp_ratio: float, layer_scale_init: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = MHSA(dim)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_attn = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.layer_scale_ffn = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_attn * self.token_mixer(self.norm(x)))
        return x + self.drop_path(self.layer_scale_ffn * self.ffn(x))


def stem(out_channels: int) -> nn.Sequential:
    """MobileOne stem: 3x3/2 conv, 3x3/2 depthwise, 1x1. (B, 3, H, W) -> (B, C, ceil(H/4), ceil(W/4))."""
    return nn.Sequential(
        MobileOneBlock(3, out_channels, 3, stride=2),
        MobileOneBlock(out_channels, out_channels, 3, stride=2, groups=out_channels),
        MobileOneBlock(out_channels, out_channels, 1),
    )
