"""LeViT backbone (Graham et al., ICCV 2021, "LeViT: a Vision Transformer in ConvNet's Clothing for
Faster Inference"; official code facebookresearch/LeViT, Apache-2.0).

Architecture (official `levit.py`, rewritten on (B, C, H, W) maps with 1x1 convolutions):

- stem: four 3x3 stride-2 Conv+BN layers, widths W/8, W/4, W/2, W (W = first stage width), with
  Hardswish between them (strides 2, 4, 8, 16);
- stage 1 (stride 16): `depth[0]` blocks of residual attention (learned per-head biases over relative
  offsets, q/k of `key_dim` channels, v of 2 * key_dim, Hardswish before the output projection) and a
  residual MLP (expansion 2, Hardswish);
- stages 2 and 3 (strides 32 and 64) open with shrink attention (queries from every second cell,
  4 * key_dim value channels, in_width / key_dim heads) and its residual MLP, then their blocks.

Detection layout (the default, `layout="detection"`): strides 4, 8, 16 and 32 can be requested.
Stride 4 and stride 8 are the stem's maps after their Hardswish (W/4 and W/2 channels); stride 16 is
stage 1 and stride 32 is stage 2. So P3 comes from the convolutional stem and global attention never
runs at stride 8. Stage 3 (stride 64) is not built in this layout and its released weights are
ignored on load; no layer deeper than the deepest requested stride is built.

`layout="official"` builds the classification trunk with outputs at the native strides 16, 32, 64
(used to check the official features).

Any input size works: every step rounds up (ceil(H / s)), with no padding or resizing of maps. The
attention biases are trained for the maps of a 224 input (14x14, 7x7, 4x4); for another map size the
per-head offset table is resized bicubically (align_corners=True) to the actual map size on every call
(see `levit_blocks.relative_position_bias`), never cached. Attention is global within a stage, so its
memory grows with the square of the token count: (B, heads, N, N) scores with N = H * W / 256 at
stride 16 (1600 tokens at 640x640, 6400 at 1280x1280).

Input normalisation: the official weights expect ImageNet mean/std; with `normalize_input=True`
(default) forward maps RGB in [0, 1] accordingly. The reference fixtures feed raw input, so their test
turns it off.

Stochastic depth: `drop_path_rate=None` (default) takes the official recipe's rate, 0.1 for LeViT-384
and 0 for the others (the `drop_path` of the official `specification`). The official code drops every
residual branch (attention and MLP) with that one constant rate; here it follows the schedule shared by
all families (`layers.drop_path_rates`): rising linearly over the residual blocks of the full model to
the rate at the last block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base import Backbone, Feature, LoadReport, normalise_variant_name, read_checkpoint
from .layers import drop_path_rates
from .levit_blocks import ConvStem, LeViTStage
from .timm_maps import release_layout

TRAINED_SIDES = (14, 7, 4)  # stage map sides at the official 224 input (224 / 16, then ceil halves)
HEAD_PREFIXES = ("head.", "head_dist.")
LAYOUTS = ("detection", "official")


@dataclass(frozen=True)
class LeViTConfig:
    """One official configuration (the `specification` table of levit.py)."""

    widths: tuple[int, int, int]  # C: channels of stages 1-3
    key_dim: int  # D: query/key channels per head
    heads: tuple[int, int, int]  # N: heads of the attention blocks per stage
    depths: tuple[int, int, int]  # X: attention+MLP blocks per stage
    official_name: str
    weights_url: str
    imagenet_top1: float  # official README, trained with distillation, 224x224
    drop_path: float = 0.0  # stochastic depth of the official training recipe


_RELEASE = "https://dl.fbaipublicfiles.com/LeViT/"
VARIANTS: dict[str, LeViTConfig] = {
    "128s": LeViTConfig((128, 256, 384), 16, (4, 6, 8), (2, 3, 4), "LeViT_128S",
                        _RELEASE + "LeViT-128S-96703c44.pth", 76.6),
    "128": LeViTConfig((128, 256, 384), 16, (4, 8, 12), (4, 4, 4), "LeViT_128",
                       _RELEASE + "LeViT-128-b88c2750.pth", 78.6),
    "192": LeViTConfig((192, 288, 384), 32, (3, 5, 6), (4, 4, 4), "LeViT_192",
                       _RELEASE + "LeViT-192-92712e41.pth", 80.0),
    "256": LeViTConfig((256, 384, 512), 32, (4, 6, 8), (4, 4, 4), "LeViT_256",
                       _RELEASE + "LeViT-256-13b5763e.pth", 81.6),
    "384": LeViTConfig((384, 512, 768), 32, (6, 9, 12), (4, 4, 4), "LeViT_384",
                       _RELEASE + "LeViT-384-9bdaf2e2.pth", 82.6, drop_path=0.1),
}

# Official constructor names (levit.py) -> variant; they are also the <Family>_<Variant> forms.
ALIASES: dict[str, str] = {config.official_name: key for key, config in VARIANTS.items()}


def official_module_map(variant: str) -> dict[str, str]:
    """Official module prefix -> ours, for the full model (all four stem convs and three stages).

    Official blocks are one flat list: per stage, attention (`blocks.j.m`) and MLP (`blocks.j+1.m`)
    pairs, with a shrink attention (`blocks.j`, not residual) and its MLP between stages.
    """
    config = VARIANTS[normalise_variant_name(variant)]
    pairs: dict[str, str] = {}
    for index in range(4):
        _add_conv_norm(pairs, f"patch_embed.{2 * index}", f"stem.convs.{index}")
    official = 0
    for stage in range(3):
        ours = f"stages.{stage}"
        if stage > 0:
            _add_shrink(pairs, official, f"{ours}.downsample")
            official += 2
        for block in range(config.depths[stage]):
            _add_block(pairs, official, f"{ours}.blocks.{block}")
            official += 2
    return pairs


def _add_conv_norm(pairs: dict[str, str], official: str, ours: str) -> None:
    pairs[f"{official}.c"] = f"{ours}.conv"
    pairs[f"{official}.bn"] = f"{ours}.bn"


def _add_mlp(pairs: dict[str, str], official_index: int, ours: str) -> None:
    _add_conv_norm(pairs, f"blocks.{official_index}.m.0", f"{ours}.fc1")
    _add_conv_norm(pairs, f"blocks.{official_index}.m.2", f"{ours}.fc2")


def _add_block(pairs: dict[str, str], official_index: int, ours: str) -> None:
    attn = f"{ours}.attn"
    pairs[f"blocks.{official_index}.m"] = attn  # holds attention_biases
    _add_conv_norm(pairs, f"blocks.{official_index}.m.qkv", f"{attn}.qkv")
    _add_conv_norm(pairs, f"blocks.{official_index}.m.proj.1", f"{attn}.proj")
    _add_mlp(pairs, official_index + 1, f"{ours}.mlp")


def _add_shrink(pairs: dict[str, str], official_index: int, ours: str) -> None:
    attn = f"{ours}.attn"
    pairs[f"blocks.{official_index}"] = attn  # holds attention_biases
    _add_conv_norm(pairs, f"blocks.{official_index}.kv", f"{attn}.kv")
    _add_conv_norm(pairs, f"blocks.{official_index}.q.1", f"{attn}.q")
    _add_conv_norm(pairs, f"blocks.{official_index}.proj.1", f"{attn}.proj")
    _add_mlp(pairs, official_index + 1, f"{ours}.mlp")


def official_key_to_ours(name: str, module_map: Mapping[str, str]) -> str:
    """Our name of official key `name`, e.g. 'blocks.6.m.qkv.c.weight' ->
    'stages.1.blocks.0.attn.qkv.conv.weight'; keys outside `module_map` (heads, unknown) keep their name."""
    module, _, leaf = name.rpartition(".")
    return f"{module_map[module]}.{leaf}" if module in module_map else name


def convert_official_state(state: Mapping[str, torch.Tensor], variant: str
                           ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official LeViT state_dict (levit.py names, no top-level key) to ours.

    Returns (our state, ignored official keys). Ignored: the classifier heads `head.*` and
    `head_dist.*` and every `attention_bias_idxs` (we index by offsets on the fly). 2-D Linear weights
    become (out, in, 1, 1) conv weights. Keys with no official meaning are kept under their own name so
    the loader reports them as unexpected.
    """
    module_map = official_module_map(variant)
    ours: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for name, tensor in state.items():
        if _head_or_index(name):
            ignored.append(name)
            continue
        if name.rpartition(".")[0].endswith(".c") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        ours[official_key_to_ours(name, module_map)] = tensor
    return ours, ignored


def _head_or_index(name: str) -> bool:
    """Release keys never loaded: classifier heads and the index buffers we rebuild on the fly."""
    return name.startswith(HEAD_PREFIXES) or name.endswith(".attention_bias_idxs")


class LeViT(Backbone):
    """LeViT as a detection backbone; see the module docstring for layout, strides and biases.

    LeViT(variant, out_strides=None, normalize_input=True, layout="detection", drop_path_rate=None)
    variant: 128S, 128, 192, 256 or 384 (case-insensitive). out_strides: a subset of (4, 8, 16, 32)
    for the detection layout (default all), of (16, 32, 64) for layout="official" (default all).
    drop_path_rate: None = the official recipe's rate for the variant.
    Output i has shape (B, out_channels[i], ceil(H / s), ceil(W / s)), s = out_strides[i].
    """

    family = "LeViT"
    variants = VARIANTS
    # The stem's last conv returns no map of its own in the detection layout (stage 1 reads it).
    trunk = ("stem.convs.0", "stem.convs.1", "stem.convs.2", "stem.convs.3",
             "stages.0", "stages.1", "stages.2")

    @classmethod
    def declare_features(cls, config: LeViTConfig, layout: str = "detection") -> list[Feature]:
        """Detection: the stem's maps at strides 4 and 8 (after their Hardswish) and stages 1-2 at 16
        and 32. Official: stages 1-3 at 16, 32 and 64."""
        if layout not in LAYOUTS:
            raise ValueError(f"LeViT: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
        width = config.widths[0]
        stages = [Feature(16 * 2 ** i, channels, f"stages.{i}") for i, channels in enumerate(config.widths)]
        if layout == "official":
            return stages
        return [Feature(4, width // 4, "stem.convs.1"), Feature(8, width // 2, "stem.convs.2"), *stages[:2]]

    def __init__(self, variant: str, out_strides: Sequence[int] | None = None, normalize_input: bool = True,
                 layout: str = "detection", drop_path_rate: float | None = None) -> None:
        super().__init__(variant, out_strides, normalize_input=normalize_input, layout=layout)
        self.layout = layout
        self.num_stem_convs = self.num_built("stem.convs")
        self.num_stages = self.num_built("stages")
        self.stem = ConvStem(self.config.widths[0], self.num_stem_convs)
        self.stages = nn.ModuleList(self._build_stages(drop_path_rate))

    def _build_stages(self, drop_path_rate: float | None) -> list[LeViTStage]:
        """Stages 1..num_stages; stochastic depth over the residual blocks (shrink blocks included)."""
        config = self.config
        rate = config.drop_path if drop_path_rate is None else drop_path_rate
        blocks_per_stage = [depth + (i > 0) for i, depth in enumerate(config.depths)]
        rates = drop_path_rates(rate, blocks_per_stage)
        return [LeViTStage(config.widths[max(i - 1, 0)], config.widths[i], config.key_dim, config.heads[i],
                           config.depths[i], TRAINED_SIDES[i], TRAINED_SIDES[i - 1] if i > 0 else None,
                           drop_paths=rates[i])
                for i in range(self.num_stages)]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem_maps = self.stem(x)
        maps = stem_maps[:3]  # strides 2, 4, 8
        if len(stem_maps) == 4:
            x = stem_maps[3]
            for stage in self.stages:
                x = stage(x)
                maps.append(x)  # strides 16, 32, 64
        return [maps[int(math.log2(stride)) - 1] for stride in self.out_strides]

    def no_weight_decay(self) -> set[str]:
        """The attention-bias tables (LeViT has no layer scales or position embeddings)."""
        return {name for name, _ in self.named_parameters() if name.endswith("attention_biases")}

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load an official release file (`{'model': state_dict}`, levit.py names) or a timm `levit_<v>`
        / `levit_conv_<v>` state_dict (recognised by its key names, see `timm_maps.py`)."""
        state = read_checkpoint(path, top_level_keys=("model", "state_dict"))
        return self.load_official_state(release_layout(self.family, self.variant, state, path), path)

    def load_official_state(self, state: Mapping[str, torch.Tensor], source: str | Path = "") -> LoadReport:
        """Load an official state_dict already in memory; layers this instance does not build (stage 3
        in the detection layout, deeper parts for shallower out_strides) are ignored."""
        module_map = official_module_map(self.variant)
        state, unbuilt = self.split_unbuilt(state, rename=lambda name: official_key_to_ours(name, module_map))
        ours, ignored = convert_official_state(state, self.variant)
        return self.finish_loading(ours, source, ignored=ignored, unbuilt=unbuilt)
