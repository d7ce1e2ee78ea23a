"""EfficientViT backbone (Liu et al., CVPR 2023, "EfficientViT: Memory Efficient Vision Transformer
with Cascaded Group Attention"; official code: github.com/microsoft/Cream, folder EfficientViT/).

Architecture (variants M0..M5, see `VARIANTS`):

    stem     four 3x3 ConvBN, ReLU between them, widths C1/8, C1/4, C1/2, C1
    stage 1  depth[0] sandwich blocks at width C1
    stage 2  Downsample (ConvFFN, PatchMerging with squeeze-excitation, ConvFFN), depth[1] blocks at C2
    stage 3  Downsample, depth[2] blocks at C3

A sandwich block is: residual 3x3 depthwise ConvBN + residual FFN, residual cascaded group attention
(per-head depthwise query conv, a learnt bias per 2-D offset) in 7x7 windows, then again residual
depthwise ConvBN + FFN. See `efficientvit_blocks.py`.

Strides. In the paper every stem conv has stride 2, so the stages sit at strides 16/32/64
(`layout="native"`, what the official downstream backbone returns). Detection needs 8/16/32, so the
default `layout="detection"` runs the stem's last conv at stride 1: the stages then sit at 8/16/32.
The weights are the same tensors (a stride is not a parameter), so the official checkpoints load into
either layout. Effect: every stage sees 2x more tokens per side than in the paper (about 4x the
compute of the native layout at one input size), and each 7x7 attention window covers 56 instead of
112 input pixels. Attention stays local (windows) at every stride, so memory grows linearly with the
image area.

Odd map sizes. Attention windows: a map whose sides are not multiples of 7 is zero-padded at the
bottom and right (also a map smaller than 7x7 on both sides, where the official code crashes) and
cropped back; padded positions take part as keys, as in the official code. The stride-2 convs use
'same' padding, so an output at stride s has ceil(H / s) x ceil(W / s) positions.

Input normalisation. The ImageNet weights expect (x - mean) / std with the ImageNet mean and std;
`forward` does it when `normalize_input=True` (default). The reference fixtures feed raw [0, 1)
input, so their test turns it off.

Pretrained weights: the classification releases (`efficientvit_m{0..5}.pth`, state_dict under
`model`, no prefix) load through `load_pretrained`; `head.*` is ignored, `attention_bias_idxs` is
rebuilt rather than loaded, and the 4x4 stage-3 bias tables of the 224-pixel release are resized
bicubically to the 7x7 windows (as the official downstream loader does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base import Backbone, Feature, LoadReport, read_checkpoint
from .efficientvit_blocks import ConvBN, Stage, resize_bias_table
from .timm_maps import release_layout

# Stage strides per layout (stage 1, 2, 3).
LAYOUT_STRIDES: dict[str, tuple[int, int, int]] = {
    "detection": (8, 16, 32),
    "native": (16, 32, 64),
}


@dataclass(frozen=True)
class EfficientViTConfig:
    """One EfficientViT variant: per-stage widths, depths and head counts, the query-conv kernel of
    each head (shared by all stages), key dimension per head and attention window side."""

    widths: tuple[int, int, int]
    depths: tuple[int, int, int]
    num_heads: tuple[int, int, int]
    query_kernels: tuple[int, ...]
    key_dim: int = 16
    window_size: int = 7


# As released (classification build.py of the official repository): M0 uses query kernels 5-5-5-5
# (the downstream file's 7-5-3-3 default for M0 does not fit the released weights).
VARIANTS: dict[str, EfficientViTConfig] = {
    "m0": EfficientViTConfig((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5)),
    "m1": EfficientViTConfig((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3)),
    "m2": EfficientViTConfig((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3)),
    "m3": EfficientViTConfig((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5)),
    "m4": EfficientViTConfig((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3)),
    "m5": EfficientViTConfig((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3)),
}

# Official constructor names (Cream: EfficientViT_M0, ...) and the release-file / timm names.
ALIASES: dict[str, str] = {
    **{f"EfficientViT_M{i}": f"m{i}" for i in range(6)},
    **{f"efficientvit_m{i}": f"m{i}" for i in range(6)},
}


class EfficientViT(Backbone):
    """EfficientViT-M0..M5 as a detection backbone (see the module docstring for the layout).

    Args:
        variant: 'M0'..'M5' (case-insensitive).
        out_strides: strides to return, a subset of the layout's strides ((8, 16, 32) for
            'detection', (16, 32, 64) for 'native'); None = all. Stages deeper than the deepest
            requested stride are not built.
        layout: 'detection' (stem's last conv at stride 1, stages at 8/16/32) or 'native' (16/32/64).
        normalize_input: apply ImageNet mean/std inside forward (input is RGB in [0, 1]).

    forward: (B, 3, H, W) -> [(B, C_s, ceil(H/s), ceil(W/s)) for s in out_strides], shallow to deep.
    """

    family = "EfficientViT"
    variants = VARIANTS

    @classmethod
    def declare_features(cls, config: EfficientViTConfig, layout: str = "detection") -> list[Feature]:
        """Stage i returns its map at the layout's i-th stride (8/16/32 or 16/32/64)."""
        strides = LAYOUT_STRIDES[_check_layout(layout)]
        return [Feature(stride, width, f"stages.{i}")
                for i, (stride, width) in enumerate(zip(strides, config.widths))]

    def __init__(
        self,
        variant: str,
        out_strides: Sequence[int] | None = None,
        layout: str = "detection",
        normalize_input: bool = True,
    ):
        super().__init__(variant, out_strides, normalize_input=normalize_input, layout=layout)
        self.layout = layout
        self.window_size = self.config.window_size
        self.stem = _build_stem(self.config.widths[0], last_stride=1 if layout == "detection" else 2)
        self.stages = nn.ModuleList(_build_stage(self.config, i) for i in range(self.num_built("stages")))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stage, stride in zip(self.stages, self.supported_strides):
            x = stage(x)
            if stride in self.out_strides:
                outputs.append(x)
        return outputs

    def no_weight_decay(self) -> set[str]:
        """The attention-bias tables (the official recipe exempts them from weight decay)."""
        return {name for name, _ in self.named_parameters() if name.endswith("attention_biases")}

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load an official classification release (e.g. efficientvit_m4.pth) or a timm
        `efficientvit_m<i>` state_dict (recognised by its key names, see `timm_maps.py`)."""
        if self.is_reparameterized:
            raise RuntimeError(f"EfficientViT: load {path} before reparameterize(); the fused module "
                               "has no BatchNorm entries to receive the release's statistics")
        official = read_checkpoint(path, top_level_keys=("model", "state_dict"))
        official = release_layout(self.family, self.variant, official, path)
        official, unbuilt = self.split_unbuilt(official, rename=official_key_to_ours)
        state, ignored = convert_official_state(official, window_size=self.window_size)
        report = self.finish_loading(state, path, ignored=ignored, unbuilt=unbuilt)
        report.resized = [key for key, value in official.items() if key.endswith("attention_biases")
                          and value.dim() == 2 and value.shape[1] != self.window_size ** 2]
        return report


def _check_layout(layout: str) -> str:
    if layout not in LAYOUT_STRIDES:
        raise ValueError(f"EfficientViT: unknown layout {layout!r}; known: {', '.join(LAYOUT_STRIDES)}")
    return layout


def _build_stem(width: int, last_stride: int) -> nn.Sequential:
    """Four 3x3 ConvBN (3 -> C/8 -> C/4 -> C/2 -> C), ReLU between them; strides 2, 2, 2, last_stride."""
    return nn.Sequential(
        ConvBN(3, width // 8, 3, stride=2), nn.ReLU(),
        ConvBN(width // 8, width // 4, 3, stride=2), nn.ReLU(),
        ConvBN(width // 4, width // 2, 3, stride=2), nn.ReLU(),
        ConvBN(width // 2, width, 3, stride=last_stride),
    )


def _build_stage(config: EfficientViTConfig, index: int) -> Stage:
    in_channels = config.widths[max(index - 1, 0)]
    return Stage(in_channels, config.widths[index], config.depths[index], config.key_dim,
                 config.num_heads[index], config.window_size, config.query_kernels, downsample=index > 0)


# ---------------------------------------------------------------------------------------------------
# Official checkpoint -> our names
# ---------------------------------------------------------------------------------------------------

_HEAD_PREFIXES = ("head.", "head_dist.")

# Within a sandwich block (official EfficientViTBlock, Residual wrappers hold their module in `.m`).
_SANDWICH_PARTS = (
    (r"^dw0\.m\.", "pre.dw."), (r"^ffn0\.m\.", "pre.ffn."), (r"^mixer\.m\.attn\.", "mixer."),
    (r"^dw1\.m\.", "post.dw."), (r"^ffn1\.m\.", "post.ffn."),
)
# Within the Sequential(Residual(dw ConvBN), Residual(FFN)) around each patch merging.
_CONV_FFN_PARTS = ((r"^0\.m\.", "dw."), (r"^1\.m\.", "ffn."))
_MERGE_PARTS = (
    (r"^conv1\.", "expand."), (r"^conv2\.", "depthwise."), (r"^conv3\.", "project."),
    (r"^se\.fc1\.", "se.reduce."), (r"^se\.fc2\.", "se.expand."),
)
# Leaf modules: Conv2d_BN's conv `c`, FFN pw1/pw2, attention qkvs/dws/proj (proj.0 is the ReLU).
_LEAF_PARTS = (
    (r"(^|\.)c\.", r"\1conv."), (r"(^|\.)pw1\.", r"\1expand."), (r"(^|\.)pw2\.", r"\1project."),
    (r"(^|\.)qkvs\.", r"\1qkv."), (r"(^|\.)dws\.", r"\1query_dw."), (r"(^|\.)proj\.1\.", r"\1proj."),
)


def _substitute(name: str, rules: Sequence[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def official_key_to_ours(key: str) -> str:
    """Map one official EfficientViT key (classification or downstream model) to our key.

    'blocks2.3.mixer.m.attn.qkvs.0.c.weight' -> 'stages.1.blocks.0.mixer.qkv.0.conv.weight'.
    Official blocks{k} holds, for k > 1, the layers around the patch merging at indices 0..2 and the
    sandwich blocks from index 3. A key that fits no rule is returned unchanged (it then shows up as
    unexpected in the load report).
    """
    key = key.removeprefix("module.")
    stem = re.fullmatch(r"patch_embed\.(\d+)\.(.+)", key)
    if stem:
        return f"stem.{stem[1]}.{_substitute(stem[2], _LEAF_PARTS)}"
    block = re.fullmatch(r"blocks(\d+)\.(\d+)\.(.+)", key)
    if not block:
        return key
    stage, index, rest = int(block[1]) - 1, int(block[2]), block[3]
    if stage == 0:
        where = f"blocks.{index}.{_substitute(rest, _SANDWICH_PARTS)}"
    elif index in (0, 2):
        where = f"downsample.{'before' if index == 0 else 'after'}.{_substitute(rest, _CONV_FFN_PARTS)}"
    elif index == 1:
        where = f"downsample.merge.{_substitute(rest, _MERGE_PARTS)}"
    else:
        where = f"blocks.{index - 3}.{_substitute(rest, _SANDWICH_PARTS)}"
    return f"stages.{stage}.{_substitute(where, _LEAF_PARTS)}"


def convert_official_state(
    official: Mapping[str, torch.Tensor], window_size: int = 7
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Convert an official EfficientViT state_dict (already unwrapped from 'model') to our keys.

    Drops the classifier (`head.*`, `head_dist.*`) and the `attention_bias_idxs` buffers (rebuilt
    from the window size) and resizes every (heads, S*S) `attention_biases` table with S != window_size
    bicubically to (heads, window_size**2). Returns (our state, ignored official keys).
    """
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in official.items():
        bare = key.removeprefix("module.")
        if bare.startswith(_HEAD_PREFIXES) or bare.endswith("attention_bias_idxs"):
            ignored.append(key)
            continue
        if bare.endswith("attention_biases") and value.dim() == 2:
            try:
                value = resize_bias_table(value, window_size)
            except ValueError as err:
                raise ValueError(f"official key {key}: {err}") from err
        state[official_key_to_ours(bare)] = value
    return state, ignored
