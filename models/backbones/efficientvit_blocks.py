"""Building blocks of EfficientViT (Liu et al., CVPR 2023): Conv+BN units, the sandwich block with
cascaded group attention over local windows, and patch merging with squeeze-excitation.

Every block maps (B, C_in, H, W) -> (B, C_out, H', W'); only `PatchMerging` changes the size
(H' = ceil(H / 2)). Attention runs inside non-overlapping square windows (7x7 for the released
models); a map whose sides are not multiples of the window is zero-padded at the bottom and right,
including a map smaller than one window, and cropped back afterwards. The padded positions take
part in attention as keys, exactly as in the official code (no mask).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBN  # Conv2d (no bias) + BatchNorm2d, folded by reparameterize()


class FeedForward(nn.Module):
    """Pointwise FFN: 1x1 ConvBN (expand) -> ReLU -> 1x1 ConvBN (project back), no residual here."""

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.expand = ConvBN(channels, hidden_channels)
        self.project = ConvBN(hidden_channels, channels, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.relu(self.expand(x)))


class ConvFeedForward(nn.Module):
    """Residual 3x3 depthwise ConvBN (local token interaction) then residual FFN (hidden = 2x).

    The outer layers of the sandwich block and the layers around each patch merging.
    """

    def __init__(self, channels: int, dw_bn_weight_init: float = 1.0):
        super().__init__()
        self.dw = ConvBN(channels, channels, 3, groups=channels, bn_weight_init=dw_bn_weight_init)
        self.ffn = FeedForward(channels, 2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dw(x)
        return x + self.ffn(x)


def relative_bias_index(window_size: int) -> torch.Tensor:
    """(N, N) int64 index into a (heads, window_size**2) bias table, N = window_size**2.

    Entry [i, j] = |dy| * window_size + |dx| for window positions i = (yi, xi), j = (yj, xj) in
    row-major order: the bias depends only on the absolute offset between query and key, and this
    numbering equals the official first-seen enumeration of offsets.
    """
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window_size + dx


def resize_bias_table(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Resize a (heads, S*S) attention-bias table to (heads, window_size**2), S = its side.

    Bicubic interpolation of the S x S offset grid (align_corners=False), as the official
    downstream loader does for the 4x4 stage-3 tables of the 224-pixel classification release.
    """
    heads, length = table.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"attention-bias table of shape {tuple(table.shape)}: {length} entries per head "
                         "is not a square number")
    if side == window_size:
        return table
    grid = table.float().reshape(1, heads, side, side)
    resized = F.interpolate(grid, size=(window_size, window_size), mode="bicubic", align_corners=False)
    return resized.reshape(heads, window_size * window_size).to(table.dtype)


def pad_to_windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right so that H and W are multiples of window_size."""
    height, width = x.shape[-2:]
    pad_bottom = (-height) % window_size
    pad_right = (-width) % window_size
    if pad_bottom or pad_right:
        x = F.pad(x, (0, pad_right, 0, pad_bottom))
    return x


def split_windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, C, H, W) with H, W multiples of window_size -> (B * nH * nW, C, window_size, window_size)."""
    batch, channels, height, width = x.shape
    rows, cols = height // window_size, width // window_size
    x = x.reshape(batch, channels, rows, window_size, cols, window_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch * rows * cols, channels, window_size, window_size)


def merge_windows(windows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `split_windows`: (B * nH * nW, C, w, w) -> (B, C, H, W)."""
    window_size, channels = windows.shape[-1], windows.shape[1]
    rows, cols = height // window_size, width // window_size
    x = windows.reshape(batch, rows, cols, channels, window_size, window_size)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention inside local windows (token mixer of the sandwich block).

    The input channels are split into `num_heads` groups; head i sees its group plus the output of
    head i-1 (the cascade). Each head projects to query/key (key_dim each) and value
    (channels / num_heads), runs a depthwise ConvBN on the query (kernel `query_kernels[i]`), and
    adds a learnt bias per absolute 2-D offset. The head outputs are concatenated, passed through
    ReLU and a 1x1 ConvBN back to `channels`.

    The (heads, N, N) bias is gathered from `attention_biases` on every call through the
    non-persistent `bias_index` buffer, so no cached copy can go stale after an in-place weight
    update (EMA), a dtype change or a device move.

    Shapes: (B, C, H, W) -> (B, C, H, W), any H, W >= 1 (padded to whole windows inside).
    """

    def __init__(
        self,
        channels: int,
        key_dim: int,
        num_heads: int,
        window_size: int,
        query_kernels: Sequence[int],
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"CascadedGroupAttention: {channels} channels do not split into {num_heads} heads")
        if len(query_kernels) < num_heads:
            raise ValueError(f"CascadedGroupAttention: {num_heads} heads need {num_heads} query kernels, "
                             f"got {list(query_kernels)}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = channels // num_heads
        self.window_size = window_size
        self.scale = key_dim ** -0.5
        group = channels // num_heads
        self.qkv = nn.ModuleList(
            ConvBN(group, 2 * key_dim + self.value_dim) for _ in range(num_heads))
        self.query_dw = nn.ModuleList(
            ConvBN(key_dim, key_dim, k, groups=key_dim) for k in query_kernels[:num_heads])
        self.proj = ConvBN(self.value_dim * num_heads, channels, bn_weight_init=0.0)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Rebuilt from the window size, never loaded: non-persistent.
        self.register_buffer("bias_index", relative_bias_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        padded = pad_to_windows(x, self.window_size)
        windows = split_windows(padded, self.window_size)
        windows = self._attend(windows)
        out = merge_windows(windows, batch, padded.shape[-2], padded.shape[-1])
        return out[:, :, :height, :width]

    def _attend(self, windows: torch.Tensor) -> torch.Tensor:
        """(Bw, C, w, w) -> (Bw, C, w, w): the cascaded heads on each window."""
        bias = self.attention_biases[:, self.bias_index]  # (heads, N, N), fresh on every call
        groups = windows.chunk(self.num_heads, dim=1)
        head_outputs = []
        feature = groups[0]
        for head in range(self.num_heads):
            if head > 0:
                feature = feature + groups[head]
            feature = self._head(feature, head, bias[head])
            head_outputs.append(feature)
        return self.proj(F.relu(torch.cat(head_outputs, dim=1)))

    def _head(self, feature: torch.Tensor, head: int, bias: torch.Tensor) -> torch.Tensor:
        """One attention head on (Bw, C/heads, w, w) windows; bias is its (N, N) table."""
        count, _, size, _ = feature.shape
        query, key, value = self.qkv[head](feature).split([self.key_dim, self.key_dim, self.value_dim], dim=1)
        query = self.query_dw[head](query)
        query, key, value = query.flatten(2), key.flatten(2), value.flatten(2)  # (Bw, dim, N)
        logits = (query.transpose(-2, -1) @ key) * self.scale + bias.to(query.dtype)  # (Bw, N, N)
        weights = logits.softmax(dim=-1)
        return (value @ weights.transpose(-2, -1)).reshape(count, self.value_dim, size, size)


class SandwichBlock(nn.Module):
    """EfficientViT block: ConvFeedForward -> residual window attention -> ConvFeedForward.

    (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, key_dim: int, num_heads: int, window_size: int,
                 query_kernels: Sequence[int]):
        super().__init__()
        self.pre = ConvFeedForward(channels, dw_bn_weight_init=0.0)
        self.mixer = CascadedGroupAttention(channels, key_dim, num_heads, window_size, query_kernels)
        self.post = ConvFeedForward(channels, dw_bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        x = x + self.mixer(x)
        return self.post(x)


class SqueezeExcite(nn.Module):
    """Channel gate: global mean -> 1x1 conv (reduce) -> ReLU -> 1x1 conv (expand) -> sigmoid."""

    def __init__(self, channels: int, reduced_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced_channels, 1)
        self.expand = nn.Conv2d(reduced_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * gate.sigmoid()


class PatchMerging(nn.Module):
    """Stride-2 downsampling: 1x1 expand (4x) -> ReLU -> 3x3 depthwise stride 2 -> ReLU -> SE -> 1x1.

    (B, C_in, H, W) -> (B, C_out, ceil(H / 2), ceil(W / 2)). The SE reduces the 4x hidden width by 4.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        hidden = 4 * in_channels
        self.expand = ConvBN(in_channels, hidden)
        self.depthwise = ConvBN(hidden, hidden, 3, stride=2, groups=hidden)
        self.se = SqueezeExcite(hidden, _round_to_multiple(hidden / 4, 8))
        self.project = ConvBN(hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.depthwise(F.relu(self.expand(x))))
        return self.project(self.se(x))


def _round_to_multiple(value: float, divisor: int) -> int:
    """Nearest multiple of divisor, at least divisor (timm's make_divisible without the 90% rule)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class Downsample(nn.Module):
    """Stage transition: ConvFeedForward at the input width, PatchMerging, ConvFeedForward at the output.

    (B, C_in, H, W) -> (B, C_out, ceil(H / 2), ceil(W / 2)).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.before = ConvFeedForward(in_channels)
        self.merge = PatchMerging(in_channels, out_channels)
        self.after = ConvFeedForward(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.merge(self.before(x)))


class Stage(nn.Module):
    """Optional Downsample followed by `depth` sandwich blocks."""

    def __init__(self, in_channels: int, channels: int, depth: int, key_dim: int, num_heads: int,
                 window_size: int, query_kernels: Sequence[int], downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_channels, channels) if downsample else None
        self.blocks = nn.Sequential(*(
            SandwichBlock(channels, key_dim, num_heads, window_size, query_kernels) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)
