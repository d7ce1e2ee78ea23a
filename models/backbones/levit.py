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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base import LOGGER, Backbone, LoadReport, load_state_into, normalise_variant_name, read_checkpoint
from .layers import IMAGENET_MEAN, IMAGENET_STD
from .levit_blocks import ConvNorm, ConvStem, LeViTStage

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
                       _RELEASE + "LeViT-384-9bdaf2e2.pth", 82.6),
}

# Official constructor names (levit.py) -> variant; they are also the <Family>_<Variant> forms.
ALIASES: dict[str, str] = {config.official_name: key for key, config in VARIANTS.items()}


def official_module_map(variant: str, num_stem_convs: int = 4, num_stages: int = 3) -> dict[str, str | None]:
    """Official module prefix -> ours (None where our module is not built at this depth).

    Official blocks are one flat list: per stage, attention (`blocks.j.m`) and MLP (`blocks.j+1.m`)
    pairs, with a shrink attention (`blocks.j`, not residual) and its MLP between stages.
    """
    config = VARIANTS[normalise_variant_name(variant)]
    pairs: dict[str, str | None] = {}
    for index in range(4):
        ours = f"stem.convs.{index}" if index < num_stem_convs else None
        _add_conv_norm(pairs, f"patch_embed.{2 * index}", ours)
    official = 0
    for stage in range(3):
        ours = f"stages.{stage}" if stage < num_stages else None
        if stage > 0:
            _add_shrink(pairs, official, _join(ours, "downsample"))
            official += 2
        for block in range(config.depths[stage]):
            _add_block(pairs, official, _join(ours, f"blocks.{block}"))
            official += 2
    return pairs


def _join(base: str | None, suffix: str) -> str | None:
    return None if base is None else f"{base}.{suffix}"


def _add_conv_norm(pairs: dict[str, str | None], official: str, ours: str | None) -> None:
    pairs[f"{official}.c"] = _join(ours, "conv")
    pairs[f"{official}.bn"] = _join(ours, "bn")


def _add_mlp(pairs: dict[str, str | None], official_index: int, ours: str | None) -> None:
    _add_conv_norm(pairs, f"blocks.{official_index}.m.0", _join(ours, "fc1"))
    _add_conv_norm(pairs, f"blocks.{official_index}.m.2", _join(ours, "fc2"))


def _add_block(pairs: dict[str, str | None], official_index: int, ours: str | None) -> None:
    attn = _join(ours, "attn")
    pairs[f"blocks.{official_index}.m"] = attn  # holds attention_biases
    _add_conv_norm(pairs, f"blocks.{official_index}.m.qkv", _join(attn, "qkv"))
    _add_conv_norm(pairs, f"blocks.{official_index}.m.proj.1", _join(attn, "proj"))
    _add_mlp(pairs, official_index + 1, _join(ours, "mlp"))


def _add_shrink(pairs: dict[str, str | None], official_index: int, ours: str | None) -> None:
    attn = _join(ours, "attn")
    pairs[f"blocks.{official_index}"] = attn  # holds attention_biases
    _add_conv_norm(pairs, f"blocks.{official_index}.kv", _join(attn, "kv"))
    _add_conv_norm(pairs, f"blocks.{official_index}.q.1", _join(attn, "q"))
    _add_conv_norm(pairs, f"blocks.{official_index}.proj.1", _join(attn, "proj"))
    _add_mlp(pairs, official_index + 1, _join(ours, "mlp"))


def convert_official_state(state: Mapping[str, torch.Tensor], variant: str, num_stem_convs: int = 4,
                           num_stages: int = 3) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official LeViT state_dict (levit.py names, no top-level key) to ours.

    Returns (our state, ignored official keys). Ignored: the classifier heads `head.*` and
    `head_dist.*`, every `attention_bias_idxs` (we index by offsets on the fly) and the keys of layers
    not built at this depth (stage 3 in the detection layout). 2-D Linear weights become
    (out, in, 1, 1) conv weights. Keys with no official meaning are kept under their own name so the
    loader reports them as unexpected.
    """
    module_map = official_module_map(variant, num_stem_convs, num_stages)
    ours: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for name, tensor in state.items():
        if _head_or_index(name):
            ignored.append(name)
            continue
        module, _, leaf = name.rpartition(".")
        if module not in module_map:
            ours[name] = tensor
            continue
        target = module_map[module]
        if target is None:
            ignored.append(name)
            continue
        if module.endswith(".c") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        ours[f"{target}.{leaf}"] = tensor
    return ours, ignored


def _head_or_index(name: str) -> bool:
    """Release keys never loaded: classifier heads and the index buffers we rebuild on the fly."""
    return name.startswith(HEAD_PREFIXES) or name.endswith(".attention_bias_idxs")


class LeViT(Backbone):
    """LeViT as a detection backbone; see the module docstring for layout, strides and biases.

    LeViT(variant, out_strides=None, normalize_input=True, layout="detection")
    variant: 128S, 128, 192, 256 or 384 (case-insensitive). out_strides: a subset of (4, 8, 16, 32)
    for the detection layout (default all), of (16, 32, 64) for layout="official" (default all).
    Output i has shape (B, out_channels[i], ceil(H / s), ceil(W / s)), s = out_strides[i].
    """

    family = "LeViT"
    variants = VARIANTS
    supported_strides = (4, 8, 16, 32)
    official_strides = (16, 32, 64)

    def __init__(self, variant: str, out_strides: Sequence[int] | None = None, normalize_input: bool = True,
                 layout: str = "detection") -> None:
        super().__init__()
        self.variant = self.resolve_variant(variant)
        self.config = self.variants[self.variant]
        self.layout = layout
        self.out_strides = self._check_layout_strides(out_strides)
        depth = int(math.log2(max(self.out_strides)))  # 2 ** depth is the deepest stride built
        self.num_stem_convs = min(depth, 4)
        self.num_stages = max(depth - 3, 0)
        widths, heads, depths = self.config.widths, self.config.heads, self.config.depths
        self.stem = ConvStem(widths[0], self.num_stem_convs)
        self.stages = nn.ModuleList(
            LeViTStage(widths[max(i - 1, 0)], widths[i], self.config.key_dim, heads[i], depths[i],
                       TRAINED_SIDES[i], TRAINED_SIDES[i - 1] if i > 0 else None)
            for i in range(self.num_stages)
        )
        self.out_channels = tuple(self._channels_at(stride) for stride in self.out_strides)
        self.normalize_input = normalize_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _check_layout_strides(self, out_strides: Sequence[int] | None) -> tuple[int, ...]:
        if self.layout not in LAYOUTS:
            raise ValueError(f"LeViT: unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        if self.layout == "detection":
            return self.check_out_strides(out_strides)
        if out_strides is None:
            return self.official_strides
        wanted = tuple(sorted(int(s) for s in out_strides))
        if not wanted or any(s not in self.official_strides for s in wanted):
            raise ValueError(f"LeViT (official layout): cannot produce strides {wanted}; "
                             f"it produces {self.official_strides}")
        return wanted

    def _channels_at(self, stride: int) -> int:
        width = self.config.widths[0]
        stem = {2: width // 8, 4: width // 4, 8: width // 2}
        return stem[stride] if stride in stem else self.config.widths[int(math.log2(stride)) - 4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> one (B, C, ceil(H / s), ceil(W / s)) map per out stride."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LeViT expects (B, 3, H, W) images, got shape {tuple(x.shape)}")
        if self.normalize_input:
            x = (x - self.mean) / self.std
        stem_maps = self.stem(x)
        maps = stem_maps[:3]  # strides 2, 4, 8
        if len(stem_maps) == 4:
            x = stem_maps[3]
            for stage in self.stages:
                x = stage(x)
                maps.append(x)  # strides 16, 32, 64
        return [maps[int(math.log2(stride)) - 1] for stride in self.out_strides]

    def reparameterize(self) -> None:
        """Fold every Conv+BN pair (stem, qkv/kv/q, projections, MLPs) into one conv with bias."""
        # Collect first: fusing swaps submodules, which must not happen under a live modules() walk.
        for module in [m for m in self.modules() if isinstance(m, ConvNorm)]:
            module.fuse()

    def no_weight_decay(self) -> set[str]:
        """The attention-bias tables (LeViT has no layer scales or position embeddings)."""
        return {name for name, _ in self.named_parameters() if name.endswith("attention_biases")}

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load an official release file (`{'model': state_dict}`, levit.py names)."""
        state = read_checkpoint(path, top_level_keys=("model", "state_dict"))
        ours, ignored = convert_official_state(state, self.variant, self.num_stem_convs, self.num_stages)
        unbuilt = [k for k in ignored if not _head_or_index(k)]
        if unbuilt:
            LOGGER.info(f"LeViT-{self.variant}: {len(unbuilt)} released tensors belong to layers this layout "
                        f"does not build (strides above {max(self.out_strides)}) and are ignored")
        return load_state_into(self, ours, source=str(path), ignored=ignored)
