"""Building blocks of RIFormer (Wang et al., CVPR 2023): the affine token mixer, the MetaFormer block
and the stage, plus the exact fold of the mixer into the norm before it.

All tensors are NCHW feature maps. A block keeps the spatial size and the channel count:
(B, C, H, W) -> (B, C, H, W).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import DropPath

GROUP_NORM_EPS = 1e-5  # mmcv's GroupNorm default, which the released weights were trained with


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with a single group: normalises each image over C x H x W, then scales per channel."""
    return nn.GroupNorm(1, channels, eps=GROUP_NORM_EPS)


def fold_affine_into_norm(norm_weight: Tensor, norm_bias: Tensor, mixer_weight: Tensor,
                          mixer_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and shift of the one norm equal to `AffineTokenMixer(norm(x))`.

    The mixer computes (w - 1) * y + b on y = gamma * n + beta (n the normalised input), which is
    gamma' * n + beta' with gamma' = gamma (w - 1) and beta' = beta (w - 1) + b. All inputs have C
    elements (any shape); the results have shape (C,).
    """
    scale = mixer_weight.reshape(-1) - 1.0
    return norm_weight.reshape(-1) * scale, norm_bias.reshape(-1) * scale + mixer_bias.reshape(-1)


class AffineTokenMixer(nn.Module):
    """The token mixer of RIFormer: a per-channel affine map minus its input, (w - 1) * x + b.

    The subtraction mirrors PoolFormer's `pool(x) - x`: the residual around the block adds x back.
    Parameters: weight (C,), bias (C,) (the official depthwise 1x1 conv stores weight as (C, 1, 1, 1)).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # Same operation order as the official conv(x) - x, so fixtures match to float rounding.
        return x * self.weight.view(-1, 1, 1) + self.bias.view(-1, 1, 1) - x


class ConvMlp(nn.Module):
    """Channel MLP as two 1x1 convs with GELU between: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden_channels, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RIFormerBlock(nn.Module):
    """MetaFormer block with the affine mixer and layer scale:

        x = x + ls1 * mixer(norm1(x))          (train-time form)
        x = x + ls1 * norm_reparam(x)          (after `reparameterize()`: mixer folded into the norm)
        x = x + ls2 * mlp(norm2(x))

    Parameter names follow mmpretrain's `RIFormerBlock`, except the mixer's (see `AffineTokenMixer`).
    """

    def __init__(self, channels: int, mlp_ratio: float = 4.0, layer_scale_init: float = 1e-5,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.token_mixer = AffineTokenMixer(channels)
        self.norm2 = group_norm(channels)
        self.mlp = ConvMlp(channels, int(channels * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.drop_path = DropPath(drop_path_rate)  # one stateless module serves both branches
        self.is_reparameterized = False

    def forward(self, x: Tensor) -> Tensor:
        if self.is_reparameterized:
            mixed = self.norm_reparam(x)
        else:
            mixed = self.token_mixer(self.norm1(x))
        x = x + self.drop_path(self.layer_scale_1.view(-1, 1, 1) * mixed)
        mlp_out = self.mlp(self.norm2(x))
        return x + self.drop_path(self.layer_scale_2.view(-1, 1, 1) * mlp_out)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace norm1 + token_mixer by one GroupNorm `norm_reparam` (exact; a no-op the second time)."""
        if self.is_reparameterized:
            return
        weight, bias = fold_affine_into_norm(self.norm1.weight, self.norm1.bias,
                                             self.token_mixer.weight, self.token_mixer.bias)
        fused = group_norm(weight.numel()).to(device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        del self.norm1, self.token_mixer
        self.norm_reparam = fused
        self.is_reparameterized = True


class RIFormerStage(nn.Module):
    """One resolution level: an optional 3x3 stride-2 downsampling conv (pad 1, so a side of n becomes
    ceil(n / 2)), then `depth` blocks. (B, C_in, H, W) -> (B, C, ceil(H/2), ceil(W/2)) or (B, C, H, W).
    """

    def __init__(self, in_channels: int, channels: int, depth: int, downsample: bool,
                 layer_scale_init: float, drop_path_rates: list[float], mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.downsample = nn.Conv2d(in_channels, channels, 3, stride=2, padding=1) if downsample else None
        self.blocks = nn.Sequential(*(
            RIFormerBlock(channels, mlp_ratio, layer_scale_init, drop_path_rates[i]) for i in range(depth)
        ))

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


def init_weights(module: nn.Module) -> None:
    """The mmpretrain training recipe: conv weights truncated-normal (std 0.02), biases 0, norms 1/0.

    The recipe treats the mixer as the depthwise 1x1 conv it is officially, so its scale starts near 0
    (the mixer starts close to -x) and its shift at 0. Layer scales keep their init value.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, AffineTokenMixer):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.GroupNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad H and W at the bottom/right up to a multiple of `multiple` (no-op when already)."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
