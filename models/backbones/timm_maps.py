"""timm-format state_dicts for the families timm implements: detection by key names and renaming.

timm 1.0 holds three of our five families (RIFormer and MPViT are not in timm):

    our family / variants        timm model names
    FastViT  t8 t12 s12 sa12     fastvit_t8, fastvit_t12, fastvit_s12, fastvit_sa12,
             sa24 sa36 ma36      fastvit_sa24, fastvit_sa36, fastvit_ma36  (training-time or
                                 `reparameterize_model`-folded state)
    LeViT    128s 128 192 256    levit_128s ... levit_384 (Linear layers) and
             384                 levit_conv_128s ... levit_conv_384 (1x1 convs): the same keys
    EfficientViT m0 ... m5       efficientvit_m0 ... efficientvit_m5 (timm's efficientvit_msra.py;
                                 not timm's efficientvit_b*/l*, a different network of the same name)

A timm file is recognised by its key names (`is_timm_state`), renamed key by key to the authors'
release layout (`timm_to_official`) and then loaded by the family's own release loader, so the
head is ignored, unbuilt stages are skipped and the attention-bias tables are resized exactly as for
a release file. The tensors themselves need no reshaping on the way: timm keeps the authors' layouts
(LeViT's per-head bias tables over |dx| * side + |dy| offsets, EfficientViT's window tables, FastViT's
(C, 1, 1) layer scales), and timm's Linear-or-conv LeViT weights are made into our 1x1 convs by the
release loader, which accepts both. timm's non-persistent `attention_bias_idxs` are simply absent.

Composition timm key -> release key -> our key, e.g. for FastViT-SA12:

    stages.3.blocks.0.layer_scale_1.gamma -> network.7.0.layer_scale_1 -> stages.3.blocks.0.layer_scale_attn
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .base import normalise_variant_name

LOGGER = logging.getLogger("vitdet." + __name__)

# (family, our variant) -> timm model name (what `timm.create_model` builds with the same tensors)
TIMM_MODELS: dict[tuple[str, str], str] = {
    **{("FastViT", v): f"fastvit_{v}" for v in ("t8", "t12", "s12", "sa12", "sa24", "sa36", "ma36")},
    **{("LeViT", v): f"levit_{v}" for v in ("128s", "128", "192", "256", "384")},
    **{("EfficientViT", f"m{i}"): f"efficientvit_m{i}" for i in range(6)},
}

# One key pattern that only timm's layout of the family has (the releases and our modules differ).
_MARKERS: dict[str, re.Pattern] = {
    "FastViT": re.compile(r"stem\.\d+\.(conv_kxk|conv_scale|identity|reparam_conv)\..+"),
    "LeViT": re.compile(r"stem\.conv\d\.linear\.weight"),
    "EfficientViT": re.compile(r"patch_embed\.conv\d\.conv\.weight"),
}


def timm_model_name(family: str, variant: str) -> str | None:
    """The timm model of our `family`-`variant`, or None when timm has no such model."""
    return TIMM_MODELS.get((family, normalise_variant_name(variant)))


def is_timm_state(family: str, state: Mapping[str, torch.Tensor]) -> bool:
    """True when `state` is laid out as timm's implementation of `family` (judged by key names)."""
    marker = _MARKERS.get(family)
    return marker is not None and any(marker.fullmatch(key) for key in state)


def release_layout(family: str, variant: str, state: Mapping[str, torch.Tensor],
                   source: str | Path = "") -> dict[str, torch.Tensor]:
    """`state` in the authors' release names: renamed from timm's when it is a timm file, else as is.

    What a family's `load_pretrained` calls right after `read_checkpoint`."""
    if not is_timm_state(family, state):
        return dict(state)
    LOGGER.info(f"{source}: a timm state_dict ({timm_model_name(family, variant) or family}); "
                "renaming timm keys to the release layout")
    return timm_to_official(family, state, variant)


def timm_to_official(family: str, state: Mapping[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """Rename a timm state_dict of `family` to the authors' release names (tensors unchanged).

    Keys that fit no rule keep their timm name, so the loader reports them as unexpected. The
    classifier (timm: `head.*`, `head_dist.*`, FastViT's `final_conv.*`) is renamed to the release's
    head names where one exists, else kept, and is ignored by the release loader either way.
    """
    converters: dict[str, Callable[[str, str], str]] = {
        "FastViT": _fastvit_key, "LeViT": _levit_key, "EfficientViT": _efficientvit_key,
    }
    if family not in converters:
        raise ValueError(f"{family} is not implemented in timm; it has no timm-format weights")
    convert = converters[family]
    name = normalise_variant_name(variant)
    return {convert(key, name): value for key, value in state.items()}


# -- FastViT ------------------------------------------------------------------------------------------

_FASTVIT_PARTS = (  # timm module names inside a block or the stem -> apple/ml-fastvit names
    (r"\bconv_kxk\.", "rbr_conv."), (r"\bconv_scale\.", "rbr_scale."), (r"\bidentity\.", "rbr_skip."),
    (r"(^|\.)mlp\.", r"\1convffn."), (r"\.gamma$", ""),
)


def _fastvit_key(key: str, variant: str) -> str:
    from .fastvit import official_network_layout

    match = re.fullmatch(r"stem\.(\d+)\.(.+)", key)
    if match:
        return f"patch_embed.{match[1]}.{_substitute(match[2], _FASTVIT_PARTS)}"
    if key.startswith("final_conv."):
        return "conv_exp." + key.removeprefix("final_conv.")  # the release's classifier conv (ignored)
    if key.startswith("head.fc."):
        return "head." + key.removeprefix("head.fc.")
    match = re.fullmatch(r"stages\.(\d+)\.(downsample|pos_emb|blocks)\.(.+)", key)
    if match is None:
        return key
    index = {where: i for i, where in official_network_layout(variant).items()}
    part = {"pos_emb": "pos_enc"}.get(match[2], match[2])
    if (int(match[1]), part) not in index:
        return key
    network, rest = f"network.{index[int(match[1]), part]}", match[3]
    if part == "downsample":  # proj.0 = ReparamLargeKernelConv, proj.1 = MobileOneBlock
        rest = re.sub(r"^proj\.0\.large_conv\.", "proj.0.lkb_origin.", rest)
        rest = re.sub(r"^proj\.0\.reparam_conv\.", "proj.0.lkb_reparam.", rest)
    elif part == "pos_enc":
        rest = re.sub(r"^pos_enc\.", "pe.", rest)
    return f"{network}.{_substitute(rest, _FASTVIT_PARTS)}"


# -- LeViT ------------------------------------------------------------------------------------------

def _levit_prefixes(variant: str) -> dict[str, str]:
    """timm module prefix -> official prefix, in the official flat `blocks` numbering."""
    from .levit import VARIANTS

    config = VARIANTS[variant]
    pairs: dict[str, str] = {}
    for i in range(4):
        _add_linear_norm(pairs, f"stem.conv{i + 1}.", f"patch_embed.{2 * i}.")
    official = 0
    for stage, depth in enumerate(config.depths):
        if stage > 0:
            timm_attn, ours = f"stages.{stage}.downsample.attn_downsample.", f"blocks.{official}."
            pairs[timm_attn + "attention_biases"] = ours + "attention_biases"
            _add_linear_norm(pairs, timm_attn + "kv.", ours + "kv.")
            _add_linear_norm(pairs, timm_attn + "q.ln.", ours + "q.1.")
            _add_linear_norm(pairs, timm_attn + "proj.ln.", ours + "proj.1.")
            _add_levit_mlp(pairs, f"stages.{stage}.downsample.mlp.", official + 1)
            official += 2
        for block in range(depth):
            timm_attn, ours = f"stages.{stage}.blocks.{block}.attn.", f"blocks.{official}.m."
            pairs[timm_attn + "attention_biases"] = ours + "attention_biases"
            _add_linear_norm(pairs, timm_attn + "qkv.", ours + "qkv.")
            _add_linear_norm(pairs, timm_attn + "proj.ln.", ours + "proj.1.")
            _add_levit_mlp(pairs, f"stages.{stage}.blocks.{block}.mlp.", official + 1)
            official += 2
    for head in ("head", "head_dist"):
        pairs[f"{head}.linear."] = f"{head}.l."
        pairs[f"{head}.bn."] = f"{head}.bn."
    return pairs


def _add_linear_norm(pairs: dict[str, str], timm: str, official: str) -> None:
    pairs[timm + "linear."] = official + "c."
    pairs[timm + "bn."] = official + "bn."


def _add_levit_mlp(pairs: dict[str, str], timm: str, official_index: int) -> None:
    _add_linear_norm(pairs, timm + "ln1.", f"blocks.{official_index}.m.0.")
    _add_linear_norm(pairs, timm + "ln2.", f"blocks.{official_index}.m.2.")


_LEVIT_CACHE: dict[str, dict[str, str]] = {}


def _levit_key(key: str, variant: str) -> str:
    pairs = _LEVIT_CACHE.setdefault(variant, _levit_prefixes(variant))
    if key in pairs:  # attention_biases: a full key
        return pairs[key]
    prefix, _, leaf = key.rpartition(".")
    return pairs[prefix + "."] + leaf if prefix + "." in pairs else key


# -- EfficientViT (MSRA) ----------------------------------------------------------------------------

def _efficientvit_key(key: str, variant: str) -> str:
    del variant  # the layout does not depend on the variant
    key = re.sub(r"\.conv\.(weight|bias)$", r".c.\1", key)  # timm ConvNorm.conv = official Conv2d_BN.c
    match = re.fullmatch(r"patch_embed\.conv(\d)\.(.+)", key)
    if match:
        return f"patch_embed.{2 * (int(match[1]) - 1)}.{match[2]}"
    if key.startswith("head.linear."):
        return "head.l." + key.removeprefix("head.linear.")
    match = re.fullmatch(r"stages\.(\d+)\.(.+)", key)
    if match is None:
        return key
    official, rest = f"blocks{int(match[1]) + 1}", match[2]
    down = re.fullmatch(r"downsample\.(res1|patchmerge|res2)\.(.+)", rest)
    if down:  # official blocks{k}: 0 = Sequential(dw, FFN), 1 = PatchMerging, 2 = Sequential(dw, FFN)
        return f"{official}.{('res1', 'patchmerge', 'res2').index(down[1])}.{down[2]}"
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if block is None:
        return key
    offset = 0 if match[1] == "0" else 3
    return f"{official}.{int(block[1]) + offset}.{block[2]}"


def _substitute(name: str, rules) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name
