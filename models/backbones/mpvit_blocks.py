"""Building blocks of MPViT (Lee et al., CVPR 2022, "Multi-Path Vision Transformer for Dense Prediction").

Written from the paper and the layer shapes of the official release; the module tree is ours, the
mapping from the official checkpoint names lives in `mpvit.py`.

Tensor layouts: images are (B, C, H, W); token sequences are (B, N, C) with N = H * W in row-major
order; per-head tensors are (B, heads, N, C / heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import ConvBN, DropPath

# Window size -> number of heads that use it in the convolutional relative position encoding (8 heads).
CRPE_WINDOWS: dict[int, int] = {3: 2, 5: 3, 7: 3}
LAYER_NORM_EPS = 1e-6


def conv_norm(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
              activation: bool = True) -> ConvBN:
    """Conv2d without bias -> BatchNorm2d -> Hardswish (or nothing): MPViT's Conv2d_BN, foldable."""
    return ConvBN(in_channels, out_channels, kernel_size, stride, groups,
                  activation=nn.Hardswish() if activation else None)


class SeparableConvNorm(nn.Module):
    """Depthwise 3x3 conv (optionally strided) -> pointwise ConvBN with Hardswish.

    One path of the multi-scale patch embedding: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s)).
    """

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)
        self.pointwise = conv_norm(channels, channels, 1, activation=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MultiScalePatchEmbed(nn.Module):
    """Stacked separable convs; path k sees the output of path k-1, so its receptive field is 3+2k.

    (B, C, H, W) -> one (B, C, H/s, W/s) map per path, s = 2 when `downsample` else 1 (the first conv
    of the stack carries the stride).
    """

    def __init__(self, channels: int, num_paths: int, downsample: bool) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            SeparableConvNorm(channels, stride=2 if downsample and k == 0 else 1) for k in range(num_paths)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for path in self.paths:
            x = path(x)
            outputs.append(x)
        return outputs


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: tokens + depthwise 3x3 conv of the tokens seen as an image."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """tokens (B, N, C), size (H, W) with N = H * W -> (B, N, C)."""
        image = tokens_to_image(tokens, size)
        return image_to_tokens(self.proj(image) + image)


class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding: q * depthwise-conv(v), window size chosen per head group.

    Heads are split in order among `CRPE_WINDOWS` (2 heads 3x3, 3 heads 5x5, 3 heads 7x7 for 8 heads).
    """

    def __init__(self, head_channels: int, num_heads: int) -> None:
        super().__init__()
        if sum(CRPE_WINDOWS.values()) != num_heads:
            raise ValueError(f"ConvRelPosEnc: the window split {CRPE_WINDOWS} needs "
                             f"{sum(CRPE_WINDOWS.values())} heads, got {num_heads}")
        self.channel_splits = [heads * head_channels for heads in CRPE_WINDOWS.values()]
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, window, 1, window // 2, groups=channels)
            for window, channels in zip(CRPE_WINDOWS, self.channel_splits)
        )

    def forward(self, q: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """q, v (B, heads, N, Ch), size (H, W) -> (B, heads, N, Ch)."""
        batch, heads, tokens, head_channels = v.shape
        height, width = size
        # (B, h, N, Ch) -> (B, h * Ch, H, W), channel index = head * Ch + c.
        v_image = v.transpose(2, 3).reshape(batch, heads * head_channels, height, width)
        parts = torch.split(v_image, self.channel_splits, dim=1)
        conv_v = torch.cat([conv(part) for conv, part in zip(self.convs, parts)], dim=1)
        conv_v = conv_v.reshape(batch, heads, head_channels, tokens).transpose(2, 3)
        return q * conv_v


class FactorizedAttention(nn.Module):
    """Factorised attention q (softmax_N(k)^T v) * scale plus the shared relative position encoding.

    Linear in N: softmax over tokens of k, then a (Ch x Ch) context per head.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"FactorizedAttention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.qkv = nn.Linear(channels, channels * 3)
        self.proj = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int], crpe: ConvRelPosEnc) -> torch.Tensor:
        """tokens (B, N, C) -> (B, N, C)."""
        batch, num_tokens, channels = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, num_tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, Ch)
        # softmax over the tokens taken on the last axis: ONNX Runtime runs a Softmax over an inner axis
        # through transposes of its own, a quarter of the whole export's time at 640 px
        context = k.transpose(2, 3).softmax(dim=-1) @ v  # (B, h, Ch, Ch)
        out = self.scale * (q @ context) + crpe(q, v, size)
        return self.proj(out.transpose(1, 2).reshape(batch, num_tokens, channels))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on tokens (B, N, C)."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden_channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_channels, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class FactorizedAttentionBlock(nn.Module):
    """cpe -> x + attn(LN(x)) -> x + mlp(LN(x)); cpe and crpe are owned by the encoder and passed in."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.attn = FactorizedAttention(channels, num_heads)
        self.norm2 = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(channels, channels * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int], cpe: ConvPosEnc,
                crpe: ConvRelPosEnc) -> torch.Tensor:
        tokens = cpe(tokens, size)
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens), size, crpe))
        return tokens + self.drop_path(self.mlp(self.norm2(tokens)))


class PathEncoder(nn.Module):
    """The transformer of one path: blocks that share one ConvPosEnc and one ConvRelPosEnc.

    (B, C, H, W) -> (B, C, H, W). The official code registers the shared modules under every block as
    well, which is why its checkpoints hold the same tensor under several names.
    """

    def __init__(self, channels: int, num_blocks: int, num_heads: int, mlp_ratio: int,
                 drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.cpe = ConvPosEnc(channels)
        self.crpe = ConvRelPosEnc(channels // num_heads, num_heads)
        self.blocks = nn.ModuleList(
            FactorizedAttentionBlock(channels, num_heads, mlp_ratio, drop_paths[i]) for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], x.shape[3])
        tokens = image_to_tokens(x)
        for block in self.blocks:
            tokens = block(tokens, size, self.cpe, self.crpe)
        return tokens_to_image(tokens, size)


class LocalResBlock(nn.Module):
    """The convolutional local path, (B, C, H, W) -> (B, C, H, W):
    x + (1x1 ConvBN-Hardswish -> depthwise 3x3 ConvBN-Hardswish -> 1x1 ConvBN).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.expand = conv_norm(channels, channels, 1, activation=True)
        self.depthwise = conv_norm(channels, channels, 3, groups=channels, activation=True)
        self.project = conv_norm(channels, channels, 1, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class MultiPathStage(nn.Module):
    """Patch embedding, one transformer per path plus the local conv path, aggregated by a 1x1 ConvBN.

    (B, C_in, H, W) -> (B, C_out, H/s, W/s), s = 2 when `downsample`. The local path reads the first
    (finest) embedding; the concat order is [local, path 0, path 1, ...] as in the release.
    """

    def __init__(self, channels: int, out_channels: int, num_paths: int, num_blocks: int, num_heads: int,
                 mlp_ratio: int, downsample: bool, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.patch_embed = MultiScalePatchEmbed(channels, num_paths, downsample)
        self.encoders = nn.ModuleList(
            PathEncoder(channels, num_blocks, num_heads, mlp_ratio, drop_paths) for _ in range(num_paths)
        )
        self.local_path = LocalResBlock(channels)
        self.aggregate = conv_norm(channels * (num_paths + 1), out_channels, 1, activation=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.patch_embed(x)
        features = [self.local_path(embeddings[0])]
        features += [encoder(embedding) for encoder, embedding in zip(self.encoders, embeddings)]
        return self.aggregate(torch.cat(features, dim=1))


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W, C)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_image(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H * W, C) -> (B, C, H, W)."""
    batch, _, channels = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, channels, size[0], size[1])


__all__ = [
    "CRPE_WINDOWS",
    "ConvPosEnc",
    "ConvRelPosEnc",
    "FactorizedAttention",
    "FactorizedAttentionBlock",
    "LocalResBlock",
    "Mlp",
    "MultiPathStage",
    "MultiScalePatchEmbed",
    "PathEncoder",
    "SeparableConvNorm",
    "conv_norm",
    "image_to_tokens",
    "tokens_to_image",
]
