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

from .base import Backbone, Feature, LoadReport, normalise_variant_name, read_checkpoint
from .layers import drop_path_rates
from .mpvit_blocks import MultiPathStage, conv_norm

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
    ignored: official names dropped on purpose: the classifier head and the duplicate names of
             shared position-encoding tensors
    sources: our key -> the official name its tensor came from
    """

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)


def convert_official_state(official: Mapping[str, torch.Tensor]) -> ConvertedState:
    """Rename an official MPViT state_dict (no prefix) to our keys.

    Names are visited in sorted order and, where several official names alias one shared tensor, the
    last one wins (in a real release they hold the same values; the reference fixtures define the
    shared value as that of the last sorted name).
    """
    converted = ConvertedState()
    for name in sorted(official):
        if name.startswith(HEAD_PREFIXES):
            converted.ignored.append(name)
            continue
        ours = official_key_to_ours(name)
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

    @classmethod
    def declare_features(cls, config: MPViTConfig) -> list[Feature]:
        """Stage i returns stride 4 * 2**i with the next stage's width (detectron2's stage2..stage5)."""
        return [Feature(stride, config.stage_out_channels(i), f"stages.{i}")
                for i, stride in enumerate(STAGE_STRIDES)]

    def __init__(self, variant: str, out_strides: Sequence[int] | None = None, *,
                 normalize_input: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__(variant, out_strides, normalize_input=normalize_input)
        dims = self.config.embed_dims
        self.stem = nn.Sequential(
            conv_norm(3, dims[0] // 2, 3, stride=2, activation=True),
            conv_norm(dims[0] // 2, dims[0], 3, stride=2, activation=True),
        )
        drop_paths = drop_path_rates(drop_path_rate, self.config.num_blocks)
        self.stages = nn.ModuleList(self._build_stage(i, drop_paths[i])
                                    for i in range(self.num_built("stages")))

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

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stride, stage in zip(STAGE_STRIDES, self.stages):
            x = stage(x)
            if stride in self.out_strides:
                outputs.append(x)
        return outputs

    def no_weight_decay(self) -> set[str]:
        """The convolutional position encodings (cpe, crpe) of every encoder; MPViT has no layer
        scales or attention-bias tables."""
        return {name for name, _ in self.named_parameters() if ".cpe." in name or ".crpe." in name}

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load an official release file (`{'model': state_dict}`, no prefix); see `convert_official_state`.

        Must be called before `reparameterize()` (the release holds unfolded BatchNorms). Stages deeper
        than the deepest requested stride are not built; their tensors are ignored.
        """
        if self.is_reparameterized:
            raise RuntimeError(f"MPViT: load_pretrained({path}) after reparameterize(); load the "
                               "weights first, then fuse")
        official = read_checkpoint(path, top_level_keys=("model", "state_dict"))
        official, unbuilt = self.split_unbuilt(official, rename=official_key_to_ours)
        converted = convert_official_state(official)
        return self.finish_loading(converted.state, path, ignored=converted.ignored, unbuilt=unbuilt)


__all__ = [
    "ALIASES",
    "MPViT",
    "MPViTConfig",
    "VARIANTS",
    "ConvertedState",
    "convert_official_state",
    "official_key_to_ours",
]
