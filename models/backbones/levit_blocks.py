"""LeViT building blocks in convolutional form: every map stays (B, C, H, W).

The official `levit.py` keeps tokens as (B, N, C) and uses Linear + BatchNorm1d. A 1x1 convolution
with BatchNorm2d on the (B, C, H, W) map computes the same numbers (BN statistics are per channel over
all positions in both cases), so the released 2-D Linear weights load here as (out, in, 1, 1).

Attention biases. Each attention layer owns a learned table `attention_biases` of shape
(heads, r * r): one value per head and per absolute offset (|dy|, |dx|), dy, dx in 0..r-1, stored
row-major, where r is the map side the layer was trained at (14, 7 or 4 for a 224 input). For a map
of another size (h, w) the table is viewed as (heads, r, r) and resized bicubically to (heads, h, w)
with `align_corners=True`, so offset 0 (a token and itself) keeps exactly its trained bias and the
largest trained offset maps onto the largest offset of the new map. The bias is rebuilt from the
parameter on every call (no cache), so in-place weight updates (EMA) are always seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBN, DropPath


def relative_position_bias(table: torch.Tensor, trained_side: int, key_size: tuple[int, int],
                           query_stride: int = 1) -> torch.Tensor:
    """Attention bias for a (h, w) key map from a per-head offset table.

    table: (heads, r * r) with r = trained_side; entry [k, dy * r + dx] is the bias of head k for
    absolute offsets (dy, dx) in map cells. Queries sit at every `query_stride`-th cell of the key
    map (1 for plain attention, 2 for shrink attention), as in the official index rule
    |stride * query - key|. Returns (heads, Nq, Nk) with Nq = ceil(h / s) * ceil(w / s), Nk = h * w,
    both flattened row-major.
    """
    heads = table.shape[0]
    height, width = key_size
    grid = table.reshape(heads, trained_side, trained_side)
    # Bicubic resize in float32 (half types lack CPU kernels); gradients flow back to the table. At the
    # trained size it is an exact copy, so it runs unconditionally (no size branch for tracing/ONNX).
    grid = F.interpolate(grid[None].float(), size=(height, width), mode="bicubic",
                         align_corners=True)[0].to(table.dtype)
    device = table.device
    query_rows = torch.arange(0, height, query_stride, device=device)
    query_cols = torch.arange(0, width, query_stride, device=device)
    dy = (query_rows[:, None] - torch.arange(height, device=device)[None, :]).abs()  # (hq, h)
    dx = (query_cols[:, None] - torch.arange(width, device=device)[None, :]).abs()  # (wq, w)
    by_column = grid[:, :, dx]  # (heads, h, wq, w): [k, Y, c, x] = grid[k, Y, dx[c, x]]
    # One gather straight into the (query row, query col, key row, key col) order: no permute copy.
    column_index = torch.arange(dx.shape[0], device=device)[None, :, None]  # (1, wq, 1)
    bias = by_column[:, dy[:, None, :], column_index]  # (heads, hq, wq, h, w)
    return bias.reshape(heads, dy.shape[0] * dx.shape[0], height * width)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
            bias: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k * scale + bias) applied to v.

    query (B, heads, kd, Nq), key (B, heads, kd, Nk), value (B, heads, vd, Nk), bias (heads, Nq, Nk)
    -> (B, heads, vd, Nq).
    """
    # Scaling the (smaller) query instead of the scores; same result to float rounding.
    attn = (query * scale).transpose(-2, -1) @ key + bias
    return value @ attn.softmax(dim=-1).transpose(-2, -1)


class Attention(nn.Module):
    """Multi-head self-attention with learned relative-position biases (LeViT 'Attention').

    (B, dim, H, W) -> (B, dim, H, W): qkv = 1x1 ConvBN, per head [q (key_dim), k (key_dim),
    v (attn_ratio * key_dim)] channels in that order, then Hardswish and a 1x1 ConvBN projection.
    """

    def __init__(self, dim: int, key_dim: int, heads: int, attn_ratio: int, trained_side: int) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, attn_ratio * key_dim
        self.scale = key_dim ** -0.5
        self.trained_side = trained_side
        self.qkv = ConvBN(dim, heads * (2 * key_dim + self.value_dim))
        self.act = nn.Hardswish()
        self.proj = ConvBN(heads * self.value_dim, dim, bn_weight_init=0.0)
        self.attention_biases = nn.Parameter(torch.zeros(heads, trained_side * trained_side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        qkv = self.qkv(x).reshape(batch, self.heads, -1, height * width)
        query, key, value = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=2)
        bias = relative_position_bias(self.attention_biases, self.trained_side, (height, width))
        out = _attend(query, key, value, self.scale, bias)
        return self.proj(self.act(out.reshape(batch, -1, height, width)))


class AttentionSubsample(nn.Module):
    """Shrink attention: queries from every second cell, keys/values from all cells (LeViT).

    (B, in_dim, H, W) -> (B, out_dim, ceil(H / 2), ceil(W / 2)). Not residual (the width changes).
    """

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, heads: int, attn_ratio: int,
                 trained_side: int) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, attn_ratio * key_dim
        self.scale = key_dim ** -0.5
        self.trained_side = trained_side
        self.kv = ConvBN(in_dim, heads * (key_dim + self.value_dim))
        self.q = ConvBN(in_dim, heads * key_dim)
        self.act = nn.Hardswish()
        self.proj = ConvBN(heads * self.value_dim, out_dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, trained_side * trained_side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        key, value = self.kv(x).reshape(batch, self.heads, -1, height * width).split(
            [self.key_dim, self.value_dim], dim=2)
        # x[:, :, ::2, ::2] as a 1x1 max pool with stride 2 (the same cells, exactly): OpenVINO's
        # dynamic-shape inference gets the strided slice's size wrong, and its export then fails
        sub = F.max_pool2d(x, kernel_size=1, stride=2)
        query = self.q(sub).reshape(batch, self.heads, self.key_dim, -1)
        bias = relative_position_bias(self.attention_biases, self.trained_side, (height, width), 2)
        out = _attend(query, key, value, self.scale, bias)
        return self.proj(self.act(out.reshape(batch, -1, sub.shape[2], sub.shape[3])))


class Mlp(nn.Module):
    """1x1 ConvBN (expand), Hardswish, 1x1 ConvBN (back): (B, dim, H, W) -> (B, dim, H, W)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = ConvBN(dim, hidden)
        self.act = nn.Hardswish()
        self.fc2 = ConvBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LeViTBlock(nn.Module):
    """Residual attention then residual MLP (official blocks j and j + 1): shape preserved.

    Both residual branches are dropped with probability `drop_path` in training (official `Residual`).
    """

    def __init__(self, dim: int, key_dim: int, heads: int, trained_side: int, mlp_ratio: int = 2,
                 attn_ratio: int = 2, drop_path: float = 0.0) -> None:
        super().__init__()
        self.attn = Attention(dim, key_dim, heads, attn_ratio, trained_side)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class ShrinkBlock(nn.Module):
    """Shrink attention then residual MLP, opening stages 2 and 3 (halves H and W)."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, trained_side: int, mlp_ratio: int = 2,
                 attn_ratio: int = 4, drop_path: float = 0.0) -> None:
        super().__init__()
        # Official down_ops: heads = in_dim // key_dim, attention ratio 4, MLP ratio 2.
        self.attn = AttentionSubsample(in_dim, out_dim, key_dim, in_dim // key_dim, attn_ratio, trained_side)
        self.mlp = Mlp(out_dim, out_dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)  # the MLP residual only: the shrink attention is not residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x)
        return x + self.drop_path(self.mlp(x))


class ConvStem(nn.Module):
    """Up to four stride-2 3x3 ConvBN layers (widths W/8, W/4, W/2, W) with Hardswish in between.

    (B, 3, H, W) -> list of maps at strides 2, 4, 8, 16 (as many as built). The maps at strides 2, 4
    and 8 are taken after their Hardswish; the stride-16 map has none (as in the official b16 stem).
    """

    def __init__(self, width: int, num_convs: int = 4) -> None:
        super().__init__()
        channels = [3, width // 8, width // 4, width // 2, width]
        self.convs = nn.ModuleList(ConvBN(channels[i], channels[i + 1], 3, 2) for i in range(num_convs))
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if index < 3:
                x = self.act(x)
            maps.append(x)
        return maps


class LeViTStage(nn.Module):
    """An optional shrink block (stride x2) then `depth` LeViT blocks at width `dim`.

    trained_side: map side of this stage's blocks at the official 224 input (14, 7, 4);
    shrink_side: the side of the map the shrink block reads (the previous stage's), None for no shrink;
    drop_paths: one stochastic-depth rate per block, the shrink block's first when there is one.
    """

    def __init__(self, in_dim: int, dim: int, key_dim: int, heads: int, depth: int, trained_side: int,
                 shrink_side: int | None = None, drop_paths: Sequence[float] | None = None) -> None:
        super().__init__()
        rates = list(drop_paths) if drop_paths is not None else [0.0] * (depth + 1)
        self.downsample = None if shrink_side is None else \
            ShrinkBlock(in_dim, dim, key_dim, shrink_side, drop_path=rates.pop(0))
        self.blocks = nn.Sequential(*(LeViTBlock(dim, key_dim, heads, trained_side, drop_path=rates[i])
                                      for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)
