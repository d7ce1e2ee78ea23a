"""RIFormer backbone (Wang et al., "RIFormer: Keep Your Vision Backbone Effective But Removing Token
Mixer", CVPR 2023), re-implemented to load the open-mmlab/mmpretrain release files.

Architecture (MetaFormer layout, four stages):
    stem     7x7 conv, stride 4, padding 2                          -> stride 4,  widths[0]
    stage i  (i > 0) 3x3 conv, stride 2, padding 1, then depths[i]  -> stride 4 * 2**i
             blocks  x += ls1 * affine_mixer(GN(x));  x += ls2 * mlp(GN(x))
    GN is GroupNorm with one group (eps 1e-5), mlp is 1x1 conv (4x) - GELU - 1x1 conv.
    Each requested output stride s has its own GroupNorm `out_norms.stride{s}` (the official
    `norm0/2/4/6`); only the stride-32 one (`norm6`) exists in the released classification weights,
    the others start fresh (weight 1, bias 0) and `load_pretrained` says so in the log.

Strides 4, 8, 16 and 32 are native stage outputs (the detection YAML reads 8, 16 and 32); no stage
deeper than the deepest requested stride is built. Sides that are multiples of 32 need no padding;
other sides are zero-padded at the bottom/right to a multiple of 4 before the stem, so output i is
always (B, out_channels[i], ceil(H / s), ceil(W / s)). Note that GroupNorm(1) statistics span the
whole map, so padded pixels (and letterbox borders) take part in them, as in the official model.

Input: RGB in [0, 1]. With `normalize_input=True` (default) forward applies the ImageNet mean/std
the release was trained with (mmpretrain's data preprocessor: mean 123.675/116.28/103.53, std
58.395/57.12/57.375 on 0-255 RGB); the reference fixtures feed raw input and turn it off.

`reparameterize()` folds each block's affine mixer into the GroupNorm before it (the paper's
structural re-parameterisation): gamma' = gamma (w - 1), beta' = beta (w - 1) + b. It is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import Tensor, nn

from .base import Backbone, Feature, LoadReport, read_checkpoint
from .layers import drop_path_rates
from .riformer_blocks import (
    RIFormerBlock,
    RIFormerStage,
    fold_affine_into_norm,
    group_norm,
    init_weights,
    pad_to_multiple,
)

STAGE_STRIDES = (4, 8, 16, 32)
OFFICIAL_PREFIX = "backbone."
OFFICIAL_HEAD_PREFIX = "head."


@dataclass(frozen=True)
class RIFormerConfig:
    """depths/widths per stage (4 each), layer-scale init value, MLP expansion ratio."""

    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    layer_scale_init: float
    mlp_ratio: float = 4.0


_SMALL = (64, 128, 320, 512)
_MEDIUM = (96, 192, 384, 768)

VARIANTS: dict[str, RIFormerConfig] = {
    "s12": RIFormerConfig((2, 2, 6, 2), _SMALL, 1e-5),
    "s24": RIFormerConfig((4, 4, 12, 4), _SMALL, 1e-5),
    "s36": RIFormerConfig((6, 6, 18, 6), _SMALL, 1e-6),
    "m36": RIFormerConfig((6, 6, 18, 6), _MEDIUM, 1e-6),
    "m48": RIFormerConfig((8, 8, 24, 8), _MEDIUM, 1e-6),
}

# Names a YAML row may use instead of `RIFormer` (each binds its variant): the paper's
# `RIFormer_S12` form and the lower-case form of mmpretrain's model names (`riformer-s12_in1k`).
ALIASES: dict[str, str] = {
    **{f"RIFormer_{name.upper()}": name for name in VARIANTS},
    **{f"riformer_{name}": name for name in VARIANTS},
}


# --------------------------------------------------------------------------------------------
# Official (mmpretrain) state_dict -> ours. Pure functions on dicts of tensors.
# --------------------------------------------------------------------------------------------

def _official_to_our_key(key: str) -> str:
    """Rename one official backbone key (prefix already stripped); unknown keys pass unchanged.

    patch_embed.proj.*         -> stem.*
    network.{2i}.{j}.*         -> stages.{i}.blocks.{j}.*   (token_mixer.affine.* -> token_mixer.*)
    network.{2i-1}.proj.*      -> stages.{i}.downsample.*
    norm{2i}.*                 -> out_norms.stride{4 * 2**i}.*
    """
    parts = key.split(".")
    if parts[:2] == ["patch_embed", "proj"]:
        return ".".join(["stem", *parts[2:]])
    if parts[0] == "network" and len(parts) > 2 and parts[1].isdigit():
        index = int(parts[1])
        stage = (index + 1) // 2
        if index % 2 == 1 and parts[2] == "proj":
            return ".".join(["stages", str(stage), "downsample", *parts[3:]])
        if index % 2 == 0:
            rest = parts[3:]
            if rest[:2] == ["token_mixer", "affine"]:  # official depthwise conv -> our plain parameters
                rest = ["token_mixer", *rest[2:]]
            return ".".join(["stages", str(stage), "blocks", parts[2], *rest])
    if parts[0].startswith("norm") and parts[0][4:].isdigit() and int(parts[0][4:]) % 2 == 0:
        stage = int(parts[0][4:]) // 2
        if stage < len(STAGE_STRIDES):
            return ".".join(["out_norms", f"stride{STAGE_STRIDES[stage]}", *parts[1:]])
    return key


def convert_official_state_dict(official: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """mmpretrain RIFormer state_dict (training-time or deploy, with or without `backbone.`) -> ours.

    Returns (our state_dict, dropped head keys). Keys we do not know keep their name, so loading
    reports them as unexpected instead of silently dropping them.
    """
    ours: dict[str, Tensor] = {}
    head: list[str] = []
    for key, value in official.items():
        if key.startswith(OFFICIAL_HEAD_PREFIX):
            head.append(key)
            continue
        bare = key[len(OFFICIAL_PREFIX):] if key.startswith(OFFICIAL_PREFIX) else key
        ours[_official_to_our_key(bare)] = value
    return ours, head


def is_deploy_state(state: Mapping[str, Tensor]) -> bool:
    """True when the blocks are in the re-parameterised form (`norm_reparam`, no `norm1`/mixer)."""
    return any(".norm_reparam." in key for key in state)


def reparameterize_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our training-time state_dict -> the re-parameterised one (same fold as `reparameterize()`)."""
    fused = dict(state)
    block_prefixes = [key[: -len("norm1.weight")] for key in state if key.endswith(".norm1.weight")]
    for prefix in block_prefixes:
        names = [f"{prefix}norm1.weight", f"{prefix}norm1.bias",
                 f"{prefix}token_mixer.weight", f"{prefix}token_mixer.bias"]
        missing = [name for name in names if name not in state]
        if missing:
            raise KeyError(f"cannot fold block {prefix[:-1]}: the state_dict lacks {missing}")
        weight, bias = fold_affine_into_norm(*(state[name] for name in names))
        for name in names:
            del fused[name]
        fused[f"{prefix}norm_reparam.weight"] = weight
        fused[f"{prefix}norm_reparam.bias"] = bias
    return fused


# --------------------------------------------------------------------------------------------
# The backbone.
# --------------------------------------------------------------------------------------------

class RIFormer(Backbone):
    """RIFormer backbone (see the module docstring for architecture, strides and normalisation).

    Args:
        variant: s12, s24, s36, m36 or m48 (any case).
        out_strides: subset of (4, 8, 16, 32) to return, shallow to deep; None = all four.
        normalize_input: apply ImageNet mean/std inside forward (the release expects it).
        drop_path_rate: stochastic-depth rate of the deepest block, rising linearly from 0.

    forward: (B, 3, H, W) RGB in [0, 1] -> [(B, out_channels[i], ceil(H/s_i), ceil(W/s_i))].
    """

    family: ClassVar[str] = "RIFormer"
    variants: ClassVar[Mapping[str, RIFormerConfig]] = VARIANTS

    @classmethod
    def declare_features(cls, config: RIFormerConfig) -> list[Feature]:
        """Stage i returns stride 4 * 2**i through its own GroupNorm `out_norms.stride{s}`."""
        return [Feature(stride, width, f"stages.{i}", f"out_norms.stride{stride}")
                for i, (stride, width) in enumerate(zip(STAGE_STRIDES, config.widths))]

    def __init__(self, variant: str, out_strides: Sequence[int] | None = None,
                 normalize_input: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__(variant, out_strides, normalize_input=normalize_input)
        rates = drop_path_rates(drop_path_rate, self.config.depths)
        self.stem = nn.Conv2d(3, self.config.widths[0], 7, stride=4, padding=2)
        self.stages = nn.ModuleList(self._build_stage(i, rates[i]) for i in range(self.num_built("stages")))
        self.out_norms = nn.ModuleDict({
            f"stride{feature.stride}": group_norm(feature.channels) for feature in self.out_features
        })
        init_weights(self)

    def _build_stage(self, index: int, rates: list[float]) -> RIFormerStage:
        depths, widths = self.config.depths, self.config.widths
        return RIFormerStage(
            in_channels=widths[index - 1] if index else widths[0], channels=widths[index],
            depth=depths[index], downsample=index > 0, layer_scale_init=self.config.layer_scale_init,
            drop_path_rates=rates, mlp_ratio=self.config.mlp_ratio,
        )

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.stem(pad_to_multiple(x, 4))
        outputs = []
        for stage, stride in zip(self.stages, STAGE_STRIDES):
            x = stage(x)
            if stride in self.out_strides:
                outputs.append(self.out_norms[f"stride{stride}"](x))
        return outputs

    # ----------------------------------------------------------------------------------------
    def blocks(self) -> list[RIFormerBlock]:
        """Every block, shallow to deep."""
        return [block for stage in self.stages for block in stage.blocks]

    def no_weight_decay(self) -> set[str]:
        """The layer scales (both per block), as in the official training recipe."""
        names = (name for name, _ in self.named_parameters())
        return {name for name in names if name.rsplit(".", 1)[-1].startswith("layer_scale")}

    # ----------------------------------------------------------------------------------------
    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load an mmpretrain release file (`state_dict`, keys `backbone.*`, head `head.*`).

        Training-time and re-parameterised (deploy) files both load: a deploy file re-parameterises
        this module first; a training-time file loaded into a re-parameterised module is folded on
        the fly. Head keys, and keys of stages/output norms this instance did not build, are
        reported as ignored. Output norms the file lacks (strides 4/8/16 in real releases) are
        reported as fresh and logged.
        """
        official = read_checkpoint(path, top_level_keys=("state_dict", "model"), prefix=OFFICIAL_PREFIX)
        official, unbuilt = self.split_unbuilt(official, rename=_official_to_our_key)
        state, ignored = convert_official_state_dict(official)
        if is_deploy_state(state):
            self.reparameterize()
        elif self.is_reparameterized:
            state = reparameterize_state_dict(state)
        return self.finish_loading(state, path, ignored=ignored, unbuilt=unbuilt)
