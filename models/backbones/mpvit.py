"""MPViT backbone (Lee et al., CVPR 2022, "Multi-Path Vision Transformer for Dense Prediction").

Architecture (blocks in `mpvit_blocks.py`):

- Stem: two 3x3 stride-2 Conv-BN-Hardswish, to stride 4 with `embed_dims[0]` channels.
- Four multi-path stages. Each starts with a multi-scale patch embedding: a stack of `num_paths`
  depthwise-separable 3x3 convs (dw 3x3 -> pw 1x1 -> BN -> Hardswish), path k taking the output of
  path k-1, so the paths see 3x3, 5x5, 7x7 patches of the same token grid. The first conv of stages
  1-3 has stride 2; stage 0 keeps stride 4. Every path runs its own transformer encoder of
  factorised-attention blocks (linear in the token count) with a convolutional position encoding
  (depthwise 3x3, shared by the encoder's blocks) and a convolutional relative position encoding
  (depthwise 3x3/5x5/7x7 over 2/3/3 heads of v, shared too). A convolutional local path (1x1 -> dw 3x3
  -> 1x1 residual block) runs on the first embedding. Local and global features are concatenated
  and aggregated by a 1x1 Conv-BN-Hardswish to the next stage's width.
- Outputs: the aggregated map of each stage, at strides 4, 8, 16, 32 with channels embed_dims[1],
  embed_dims[2], embed_dims[3], embed_dims[3] (the official detectron2 backbone's stage2..stage5).
  Strides 8/16/32 are native; nothing is padded or resized. Every conv pads 'same', so an input of
  any size gives maps of ceil(H / s) x ceil(W / s); multiples of 32 give exact divisions.
- Only the stages up to the deepest requested stride are built; there are no output norms, so every
  parameter is used by every forward.

Input: RGB in [0, 1]; forward normalises with the ImageNet mean/std the released weights were
trained with (constructor option `normalize_input=False` skips it, e.g. to feed already-normalised
tensors or to compare with the official features).

Weights: the official ImageNet-1k releases (`{'model': state_dict}`, no prefix, classifier
`cls_head.cls.*`), https://dl.dropbox.com/s/<id>/mpvit_{tiny,xsmall,small,base}.pth from
github.com/youngwanLEE/MPViT, dual-licensed GPL-3.0 / commercial (ETRI). This file is an independent
implementation; `load_pretrained` maps the official names onto ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .base import Backbone, LoadReport, load_state_into, normalise_variant_name, read_checkpoint
from .layers import IMAGENET_MEAN, IMAGENET_STD
from .mpvit_blocks import ConvNorm, MultiPathStage, fuse_conv_norms

STAGE_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class MPViTConfig:
    """One MPViT size: per-stage widths, transformer blocks per path and number of paths."""

    embed_dims: tuple[int, int, int, int]
    num_blocks: tuple[int, int, int, int]
    num_paths: tuple[int, int, int, int] = (2, 3, 3, 3)
    mlp_ratio: int = 4
    num_heads: int = 8

    def stage_out_channels(self, stage: int) -> int:
        """Channels of stage `stage`'s output: the next stage's width, the last width for the last."""
        return self.embed_dims[min(stage + 1, len(self.embed_dims) - 1)]


VARIANTS: dict[str, MPViTConfig] = {
    "tiny": MPViTConfig(embed_dims=(64, 96, 176, 216), num_blocks=(1, 2, 4, 1), mlp_ratio=2),
    "xsmall": MPViTConfig(embed_dims=(64, 128, 192, 256), num_blocks=(1, 2, 4, 1)),
    "small": MPViTConfig(embed_dims=(64, 128, 216, 288), num_blocks=(1, 3, 6, 3)),
    "base": MPViTConfig(embed_dims=(128, 224, 368, 480), num_blocks=(1, 3, 8, 3)),
}

# The paper's short names (MPViT-T, -XS, -S, -B) -> variant.
SHORT_NAMES: dict[str, str] = {"t": "tiny", "xs": "xsmall", "s": "small", "b": "base"}

# Official constructor names and <Family>_<Variant> forms -> variant (YAML-usable aliases).
ALIASES: dict[str, str] = {
    "mpvit_tiny": "tiny",
    "mpvit_xsmall": "xsmall",
    "mpvit_small": "small",
    "mpvit_base": "base",
    "MPViT_Tiny": "tiny",
    "MPViT_XSmall": "xsmall",
    "MPViT_Small": "small",
    "MPViT_Base": "base",
}

HEAD_PREFIXES = ("cls_head.",)

# Official name -> ours. The official blocks also register the encoder's shared cpe/crpe modules, so
# `...MHCA_layers.<l>.cpe`, `...MHCA_layers.<l>.crpe` and `...factoratt_crpe.crpe` alias the encoder's.
_PATCH = r"^patch_embed_stages\.(\d+)\.patch_embeds\.(\d+)\.patch_conv\."
_ENCODER = r"^mhca_stages\.(\d+)\.mhca_blks\.(\d+)\."
_KEY_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^stem\.(\d)\.(conv|bn)\.", r"stem.\1.\2."),
        (_PATCH + r"dwconv\.", r"stages.\1.patch_embed.paths.\2.depthwise."),
        (_PATCH + r"pwconv\.", r"stages.\1.patch_embed.paths.\2.pointwise.conv."),
        (_PATCH + r"bn\.", r"stages.\1.patch_embed.paths.\2.pointwise.bn."),
        (_ENCODER + r"(?:MHCA_layers\.\d+\.)?cpe\.", r"stages.\1.encoders.\2.cpe."),
        (_ENCODER + r"(?:MHCA_layers\.\d+\.(?:factoratt_crpe\.)?)?crpe\.conv_list\.",
         r"stages.\1.encoders.\2.crpe.convs."),
        (_ENCODER + r"MHCA_layers\.(\d+)\.factoratt_crpe\.(qkv|proj)\.",
         r"stages.\1.encoders.\2.blocks.\3.attn.\4."),
        (_ENCODER + r"MHCA_layers\.(\d+)\.(mlp\.fc[12]|norm[12])\.", r"stages.\1.encoders.\2.blocks.\3.\4."),
        (r"^mhca_stages\.(\d+)\.InvRes\.conv1\.", r"stages.\1.local_path.expand."),
        (r"^mhca_stages\.(\d+)\.InvRes\.dwconv\.", r"stages.\1.local_path.depthwise.conv."),
        (r"^mhca_stages\.(\d+)\.InvRes\.norm\.", r"stages.\1.local_path.depthwise.bn."),
        (r"^mhca_stages\.(\d+)\.InvRes\.conv2\.", r"stages.\1.local_path.project."),
        (r"^mhca_stages\.(\d+)\.aggregate\.", r"stages.\1.aggregate."),
    )
)


def official_key_to_ours(name: str) -> str:
    """Map one official MPViT state_dict name to ours; names no rule knows are returned unchanged."""
    for pattern, replacement in _KEY_RULES:
        renamed, count = pattern.subn(replacement, name, count=1)
        if count:
            return renamed
    return name


@dataclass
class ConvertedState:
    """An official state_dict in our names.

    state:   our key -> tensor
    ignored: official names dropped on purpose: the classifier head, the duplicate names of shared
             position-encoding tensors, and stages deeper than the module that will receive it
    sources: our key -> the official name its tensor came from
    """

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)


def convert_official_state(official: Mapping[str, torch.Tensor], num_stages: int = 4) -> ConvertedState:
    """Rename an official MPViT state_dict (no prefix) to our keys.

    Names are visited in sorted order and, where several official names alias one shared tensor, the
    last one wins (in a real release they hold the same values; the reference fixtures define the
    shared value as that of the last sorted name). `num_stages` < 4 drops the deeper stages' keys.
    """
    converted = ConvertedState()
    for name in sorted(official):
        if name.startswith(HEAD_PREFIXES):
            converted.ignored.append(name)
            continue
        ours = official_key_to_ours(name)
        stage = re.match(r"^stages\.(\d+)\.", ours)
        if stage and int(stage.group(1)) >= num_stages:
            converted.ignored.append(name)
            continue
        if ours in converted.sources:
            converted.ignored.append(converted.sources[ours])
        converted.state[ours] = official[name]
        converted.sources[ours] = name
    return converted


class MPViT(Backbone):
    """MPViT-Tiny/XSmall/Small/Base (see the module docstring).

    forward: (B, 3, H, W) RGB in [0, 1] -> one (B, C_s, ceil(H/s), ceil(W/s)) map per requested stride
    s in (4, 8, 16, 32), shallow to deep.

    Options: `normalize_input` (default True: ImageNet mean/std inside forward), `drop_path_rate`
    (stochastic depth, linearly rising over all blocks as in the official code; 0.1 in the official
    detection configs).
    """

    family: ClassVar[str] = "MPViT"
    variants: ClassVar[Mapping[str, MPViTConfig]] = VARIANTS
    supported_strides: ClassVar[tuple[int, ...]] = STAGE_STRIDES

    def __init__(self, variant: str, out_strides: Sequence[int] | None = None, *,
                 normalize_input: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.variant = self.resolve_variant(variant)
        self.config = VARIANTS[self.variant]
        self.out_strides = self.check_out_strides(out_strides)
        num_stages = STAGE_STRIDES.index(self.out_strides[-1]) + 1
        self.out_channels = tuple(self.config.stage_out_channels(STAGE_STRIDES.index(stride))
                                  for stride in self.out_strides)
        self.normalize_input = normalize_input
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        dims = self.config.embed_dims
        self.stem = nn.Sequential(
            ConvNorm(3, dims[0] // 2, 3, stride=2, activation=True),
            ConvNorm(dims[0] // 2, dims[0], 3, stride=2, activation=True),
        )
        drop_paths = _drop_path_schedule(drop_path_rate, self.config.num_blocks)
        self.stages = nn.ModuleList(self._build_stage(i, drop_paths[i]) for i in range(num_stages))

    @classmethod
    def resolve_variant(cls, variant: str | None) -> str:
        """Like `Backbone.resolve_variant`, also accepting the paper's names: T/XS/S/B, 'MPViT-T',
        'mpvit_small'."""
        if variant is not None:
            key = normalise_variant_name(variant)
            key = key[len("mpvit"):] if key.startswith("mpvit") else key
            if key in SHORT_NAMES or key in cls.variants:
                variant = SHORT_NAMES.get(key, key)
        return super().resolve_variant(variant)

    def _build_stage(self, index: int, drop_paths: Sequence[float]) -> MultiPathStage:
        cfg = self.config
        return MultiPathStage(
            channels=cfg.embed_dims[index],
            out_channels=cfg.stage_out_channels(index),
            num_paths=cfg.num_paths[index],
            num_blocks=cfg.num_blocks[index],
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            downsample=index > 0,
            drop_paths=drop_paths,
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> maps at `out_strides`, shallow to deep (see the class docstring)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MPViT expects (B, 3, H, W) RGB input, got shape {tuple(x.shape)}")
        if self.normalize_input:
            x = (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        x = self.stem(x)
        outputs = []
        for stride, stage in zip(STAGE_STRIDES, self.stages):
            x = stage(x)
            if stride in self.out_strides:
                outputs.append(x)
        return outputs

    @property
    def is_fused(self) -> bool:
        """True once `reparameterize()` has folded the BatchNorms."""
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())

    def reparameterize(self) -> None:
        """Fold every Conv+BN pair (stem, patch embeddings, local path, aggregation) in place.

        Exact in eval mode (BN uses running statistics); idempotent. MPViT has no paper-level
        reparameterisation; the attention and position-encoding convs stay as they are.
        """
        fuse_conv_norms(self)

    def no_weight_decay(self) -> set[str]:
        """The convolutional position encodings (cpe, crpe) of every encoder; MPViT has no layer
        scales or attention-bias tables."""
        return {name for name, _ in self.named_parameters() if ".cpe." in name or ".crpe." in name}

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load an official release file (`{'model': state_dict}`, no prefix); see `convert_official_state`.

        Must be called before `reparameterize()` (the release holds unfolded BatchNorms).
        """
        if self.is_fused:
            raise RuntimeError(f"MPViT: load_pretrained({path}) after reparameterize(); load the "
                               "weights first, then fuse")
        official = read_checkpoint(path, top_level_keys=("model", "state_dict"))
        converted = convert_official_state(official, num_stages=len(self.stages))
        return load_state_into(self, converted.state, source=str(path), ignored=converted.ignored)


def _drop_path_schedule(rate: float, num_blocks: Sequence[int]) -> list[list[float]]:
    """Per-stage drop-path rates rising linearly from 0 to `rate` over all blocks (shared by paths)."""
    rates = torch.linspace(0, rate, sum(num_blocks)).tolist()
    schedule, start = [], 0
    for count in num_blocks:
        schedule.append(rates[start:start + count])
        start += count
    return schedule


__all__ = [
    "ALIASES",
    "MPViT",
    "MPViTConfig",
    "VARIANTS",
    "ConvertedState",
    "convert_official_state",
    "official_key_to_ours",
]
