"""FastViT backbones (Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization", ICCV 2023; official code apple/ml-fastvit).

Architecture (four stages, widths `widths`, depths `depths`):

    stem     MobileOne 3x3/2 conv -> MobileOne 3x3/2 depthwise -> MobileOne 1x1     stride 4
    stage 0  RepMixer blocks                                                         stride 4
    stage i  PatchEmbed (7x7/2 reparameterisable large-kernel conv + MobileOne 1x1)  stride 4 * 2^i
             [RepCPE conditional position encoding, last stage of SA/MA variants]
             RepMixer blocks (T/S variants, and stages 0-2 of SA/MA) or MHSA blocks (last stage of SA/MA)

Every block has a ConvFFN (7x7 depthwise conv-BN, 1x1 expand, GELU, 1x1) and layer scale. The outputs
are the stage outputs at strides 4, 8, 16 and 32 (the stride-32 map is taken *after* the attention stage;
the official multi-output mode returns the RepCPE output there instead, which we do not copy). All
downsampling convolutions are stride 2 with "same" padding, so any input size works and an output at
stride s is exactly ceil(H / s) x ceil(W / s); no padding or resizing is ever done. Attention is global
and runs only at stride 32.

Options:
- `normalize_input` (default True): the input is RGB in [0, 1]; the official weights were trained on
  ImageNet mean/std normalised images, so forward normalises first. Turn it off to feed raw tensors.
- `out_norms` (default True): a BatchNorm2d on each requested output, as in the official dense-prediction
  mode. No release contains them; `load_pretrained` reports them as fresh. Off gives the raw stage taps.
- `drop_path_rate` (default 0): stochastic depth, rising linearly over all blocks.

`reparameterize()` folds every MobileOne block, RepMixer, large-kernel conv and RepCPE into one conv
each (the paper's inference architecture); BatchNorms in the FFNs, the attention stage and the output
norms stay as they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base import Backbone, Feature, LoadReport, normalise_variant_name, read_checkpoint
from .fastvit_blocks import AttentionBlock, PatchEmbed, RepCPE, RepMixerBlock, stem
from .layers import drop_path_rates
from .timm_maps import release_layout

LOGGER = logging.getLogger("vitdet." + __name__)

STAGE_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class FastViTConfig:
    """One FastViT configuration (values of apple/ml-fastvit's constructor functions)."""

    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    mlp_ratio: float
    attention_last: bool = False  # RepCPE + MHSA blocks in the last stage (SA/MA variants)
    layer_scale_init: float = 1e-5


_SMALL, _MEDIUM = (64, 128, 256, 512), (76, 152, 304, 608)
VARIANTS: dict[str, FastViTConfig] = {
    "t8": FastViTConfig((2, 2, 4, 2), (48, 96, 192, 384), mlp_ratio=3.0),
    "t12": FastViTConfig((2, 2, 6, 2), _SMALL, mlp_ratio=3.0),
    "s12": FastViTConfig((2, 2, 6, 2), _SMALL, mlp_ratio=4.0),
    "sa12": FastViTConfig((2, 2, 6, 2), _SMALL, mlp_ratio=4.0, attention_last=True),
    "sa24": FastViTConfig((4, 4, 12, 4), _SMALL, mlp_ratio=4.0, attention_last=True),
    "sa36": FastViTConfig((6, 6, 18, 6), _SMALL, mlp_ratio=4.0, attention_last=True, layer_scale_init=1e-6),
    "ma36": FastViTConfig((6, 6, 18, 6), _MEDIUM, mlp_ratio=4.0, attention_last=True, layer_scale_init=1e-6),
}

# official constructor names (fastvit_sa12) and FastViT_<Variant> forms -> variant
ALIASES: dict[str, str] = {
    **{f"fastvit_{name}": name for name in VARIANTS},
    **{f"FastViT_{name.upper()}": name for name in VARIANTS},
}

HEAD_PREFIXES = ("conv_exp.", "head.")


class FastViTStage(nn.Module):
    """[PatchEmbed] -> [RepCPE] -> blocks. (B, C_prev, H, W) -> (B, C, ceil(H/2), ceil(W/2)) (stage 0 keeps
    the stem's size)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, mlp_ratio: float, downsample: bool,
                 attention: bool, layer_scale_init: float, drop_path_rates: Sequence[float]) -> None:
        super().__init__()
        self.downsample = PatchEmbed(in_channels, out_channels) if downsample else None
        self.pos_enc = RepCPE(out_channels) if attention else None
        block = AttentionBlock if attention else RepMixerBlock
        self.blocks = nn.Sequential(*(block(out_channels, mlp_ratio, layer_scale_init, drop_path_rates[i])
                                      for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.pos_enc is not None:
            x = self.pos_enc(x)
        return self.blocks(x)


class FastViT(Backbone):
    """FastViT T8/T12/S12/SA12/SA24/SA36/MA36 with outputs at strides 4, 8, 16, 32 (see module docstring).

    forward: (B, 3, H, W) RGB in [0, 1] -> one (B, out_channels[i], ceil(H/s), ceil(W/s)) map per
    requested stride s, shallow to deep. Only the stages up to the deepest requested stride are built.
    """

    family = "FastViT"
    variants = VARIANTS

    @classmethod
    def declare_features(cls, config: FastViTConfig) -> list[Feature]:
        """Stage i returns stride 4 * 2**i, through the BatchNorm `norms.stride{s}` when out_norms is on."""
        return [Feature(stride, width, f"stages.{i}", f"norms.stride{stride}")
                for i, (stride, width) in enumerate(zip(STAGE_STRIDES, config.widths))]

    def __init__(self, variant: str, out_strides: Sequence[int] | None = None, normalize_input: bool = True,
                 out_norms: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__(variant, out_strides, normalize_input=normalize_input)
        config = self.config
        rates = drop_path_rates(drop_path_rate, config.depths)
        self.stem = stem(config.widths[0])
        self.stages = nn.ModuleList(self._build_stage(i, rates[i]) for i in range(self.num_built("stages")))
        self.norms = nn.ModuleDict({
            f"stride{feature.stride}": nn.BatchNorm2d(feature.channels) for feature in self.out_features
        }) if out_norms else None

    def _build_stage(self, index: int, rates: Sequence[float]) -> FastViTStage:
        config = self.config
        return FastViTStage(
            config.widths[max(index - 1, 0)], config.widths[index], config.depths[index], config.mlp_ratio,
            downsample=index > 0, attention=config.attention_last and index == len(config.depths) - 1,
            layer_scale_init=config.layer_scale_init, drop_path_rates=rates)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stride, stage in zip(STAGE_STRIDES, self.stages):
            x = stage(x)
            if stride in self.out_strides:
                outputs.append(self.norms[f"stride{stride}"](x) if self.norms is not None else x)
        return outputs

    def no_weight_decay(self) -> set[str]:
        """Layer scales and the position-encoding conv (attention has no bias tables in FastViT)."""
        return {name for name, _ in self.named_parameters()
                if name.rsplit(".", 1)[-1].startswith("layer_scale") or ".pos_enc." in name}

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load an apple/ml-fastvit release (`fastvit_<v>.pth.tar` or `fastvit_<v>_reparam.pth.tar`), or
        a timm `fastvit_<v>` state_dict (training-time or folded; recognised by its key names, see
        `timm_maps.py`).

        A `_reparam` file loads into the folded form: this module is reparameterised first if it is not
        yet. A training-time file cannot load into an already folded module (an error says so). The head,
        and stages or output norms this instance does not build, are ignored.
        """
        state = read_checkpoint(path, top_level_keys=("state_dict", "model"), prefix="backbone.")
        state = release_layout(self.family, self.variant, state, path)
        release_fused = is_reparameterized_release(state)
        if release_fused and not self.is_reparameterized:
            LOGGER.info(f"{path}: a reparameterised release; folding FastViT-{self.variant.upper()} first")
            self.reparameterize()
        elif not release_fused and self.is_reparameterized:
            raise ValueError(f"{path}: a training-time (unfused) FastViT release cannot load into a module "
                             "that was already reparameterised; load it before calling reparameterize()")
        names = official_to_ours(state, self.variant)
        state, unbuilt = self.split_unbuilt(state, rename=names.get)
        ours = {names[key]: value for key, value in state.items() if names[key] is not None}
        ignored = [key for key in state if names[key] is None]
        return self.finish_loading(ours, path, ignored=ignored, unbuilt=unbuilt)


def is_reparameterized_release(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the `_reparam` releases (folded convs instead of train-time branches)."""
    return any(".reparam_conv." in key or ".lkb_reparam." in key or key.startswith("reparam_conv")
               for key in state if not key.startswith(HEAD_PREFIXES))


def official_network_layout(variant: str) -> dict[int, tuple[int, str]]:
    """Official `network` ModuleList index -> (our stage, part); part: blocks, downsample or pos_enc."""
    config = VARIANTS[normalise_variant_name(variant)]
    layout, index = {}, 0
    for stage in range(len(config.depths)):
        if stage > 0:
            layout[index], index = (stage, "downsample"), index + 1
        if config.attention_last and stage == len(config.depths) - 1:
            layout[index], index = (stage, "pos_enc"), index + 1
        layout[index], index = (stage, "blocks"), index + 1
    return layout


# (official, ours) renames of the name segments inside a module, applied left to right
_SEGMENT_RENAMES = (
    (r"\brbr_conv\b", "conv_branches"),
    (r"\brbr_scale\b", "scale_branch"),
    (r"\brbr_skip\b", "identity_bn"),
    (r"\breparam_conv\b", "fused_conv"),
    (r"\blkb_reparam\b", "fused_conv"),
    (r"\blkb_origin\b", "large"),
    (r"\bsmall_conv\b", "small"),
    (r"\bconvffn\.conv\b", "ffn.depthwise"),
    (r"\bconvffn\b", "ffn"),
    (r"\blayer_scale_1\b", "layer_scale_attn"),
    (r"\blayer_scale_2\b", "layer_scale_ffn"),
)


def convert_official_key(key: str, layout: Mapping[int, tuple[int, str]], attention_last: bool) -> str | None:
    """Our name of official backbone key `key` (None when the key is not a backbone key we know)."""
    match = re.fullmatch(r"patch_embed\.(\d+)\.(.+)", key)
    if match:
        prefix, rest = f"stem.{match.group(1)}.", match.group(2)
    else:
        match = re.fullmatch(r"network\.(\d+)\.(.+)", key)
        if match is None or int(match.group(1)) not in layout:
            return _convert_fork_norm(key, attention_last)
        stage, part = layout[int(match.group(1))]
        prefix, rest = f"stages.{stage}.{part}.", match.group(2)
        if part == "downsample":
            rest = re.sub(r"^proj\.0\.", "large_kernel.", re.sub(r"^proj\.1\.", "pointwise.", rest))
        elif part == "pos_enc":
            rest = re.sub(r"^pe\.", "conv.", rest)
    for pattern, replacement in _SEGMENT_RENAMES:
        rest = re.sub(pattern, replacement, rest)
    return prefix + rest


def _convert_fork_norm(key: str, attention_last: bool) -> str | None:
    """Official dense-prediction norms norm0/2/4/6 -> our output norms (norm6 of SA/MA normalises the
    pre-attention map, not our stride-32 output, so it has no home)."""
    match = re.fullmatch(r"norm(\d)\.(.+)", key)
    strides = {"0": 4, "2": 8, "4": 16} if attention_last else {"0": 4, "2": 8, "4": 16, "6": 32}
    if match is None or match.group(1) not in strides:
        return None
    return f"norms.stride{strides[match.group(1)]}.{match.group(2)}"


def official_to_ours(keys: Iterable[str], variant: str) -> dict[str, str | None]:
    """Official key -> our key, for every key of an apple/ml-fastvit state_dict (training-time or
    `_reparam`). None marks keys dropped on purpose: the classifier (`conv_exp.*`, `head.*`) and the
    SA/MA `norm6.*`. Keys we cannot place keep their official name, so loading reports them as unexpected.
    """
    name = normalise_variant_name(variant)
    if name not in VARIANTS:
        raise ValueError(f"FastViT: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    layout = official_network_layout(name)
    attention_last = VARIANTS[name].attention_last
    names = {}
    for key in keys:
        if key.startswith(HEAD_PREFIXES) or (attention_last and key.startswith("norm6.")):
            names[key] = None
        else:
            names[key] = convert_official_key(key, layout, attention_last) or key
    return names


def convert_official_state_dict(state: Mapping[str, torch.Tensor], variant: str
                                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an apple/ml-fastvit state_dict to our keys: (our state, ignored official keys)."""
    names = official_to_ours(state, variant)
    ours = {names[key]: value for key, value in state.items() if names[key] is not None}
    return ours, [key for key, ours_key in names.items() if ours_key is None]
