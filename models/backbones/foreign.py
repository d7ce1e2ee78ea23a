"""Helpers shared by the backbone nodes that wrap models of other libraries (timm, torchvision).

- `read_weight_file`: a classification checkpoint as a {name: tensor} dict, from .pth/.pt/.bin
  (torch.load with weights_only=True) or .safetensors (read here, without the safetensors package:
  an 8-byte little-endian header length, a JSON header, then raw little-endian tensor bytes).
- `fold_conv_bn_pairs`: Conv+BN folding inside foreign modules where the fold is known to be exact:
  consecutive Conv2d -> BatchNorm2d children of an nn.Sequential, timm's ConvNormAct (`conv`, `bn`), and
  named (conv, bn) attribute pairs of blocks whose forward applies the BN right after the conv.
- `to_nchw`: channels-last maps (B, H, W, C) to (B, C, H, W).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .base import read_checkpoint
from .layers import fold_batch_norm

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """{name: tensor} of a checkpoint file; .safetensors is parsed here, anything else by torch.load
    (weights_only=True; a top-level 'state_dict' or 'model' entry is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_checkpoint(path, top_level_keys=("state_dict", "model", "module"))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file (format: u64 header size, JSON {name: {dtype, shape,
    data_offsets}}, data). Only plain data is read, nothing is executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise RuntimeError(f"{path}: too short to be a .safetensors file")
    (header_size,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + header_size])
    except ValueError as err:
        raise RuntimeError(f"{path}: not a .safetensors file (unreadable header: {err})") from err
    data = raw[8 + header_size:]
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec.get("dtype") not in _SAFETENSORS_DTYPES:
            raise RuntimeError(f"{path}: tensor {name} has an unsupported dtype {spec.get('dtype')!r}")
        start, end = spec["data_offsets"]
        buffer = bytearray(data[start:end])  # a writable copy: torch.frombuffer shares the memory
        dtype = _SAFETENSORS_DTYPES[spec["dtype"]]
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        tensors[name] = tensor.reshape(spec["shape"])
    return tensors


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W), contiguous."""
    return x.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Conv + BN folding inside foreign modules
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def fold_into_conv_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode `bn` into `conv`'s own weight and bias, in place (the conv keeps its class, so
    subclasses that pad first, such as timm's Conv2dSame, stay exact)."""
    weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)


def bn_remainder(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a BN once folded: Identity, or timm's BatchNormAct2d's dropout + activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if drop is None and act is None:
        return nn.Identity()
    return nn.Sequential(drop or nn.Identity(), act or nn.Identity())


def _foldable(conv: object, bn: object) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(bn) in _BN_TYPES and bn.track_running_stats
            and bn.running_var is not None and conv.out_channels == bn.num_features)


def _bn_types() -> tuple[type, ...]:
    types: list[type] = [nn.BatchNorm2d]
    try:
        from timm.layers import BatchNormAct2d
        types.append(BatchNormAct2d)
    except ImportError:  # timm is optional for torchvision-only use
        pass
    return tuple(types)


_BN_TYPES = _bn_types()


def known_pairs() -> dict[type, Sequence[tuple[str, str]]]:
    """{block class: [(conv attribute, bn attribute), ...]} whose forward runs bn directly on conv's
    output (read from the classes' forward methods), so folding is exact. Exact class match only."""
    pairs: dict[type, Sequence[tuple[str, str]]] = {}
    try:
        from timm.layers import ConvNormAct
        from timm.models import _efficientnet_blocks as eb
        from timm.models import resnet
    except ImportError:
        return pairs
    pairs[ConvNormAct] = [("conv", "bn")]
    pairs[resnet.BasicBlock] = [("conv1", "bn1"), ("conv2", "bn2")]
    pairs[resnet.Bottleneck] = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    pairs[eb.ConvBnAct] = [("conv", "bn1")]
    pairs[eb.DepthwiseSeparableConv] = [("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"), ("conv_pw", "bn2")]
    pairs[eb.InvertedResidual] = [("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"), ("conv_dw", "bn2"),
                                  ("conv_pwl", "bn3")]
    return pairs


def fold_conv_bn_pairs(root: nn.Module, pairs: Mapping[type, Sequence[tuple[str, str]]] | None = None,
                       ) -> int:
    """Fold every exactly foldable Conv+BN below `root` in place; returns how many were folded."""
    pairs = known_pairs() if pairs is None else pairs
    folded = 0
    for module in list(root.modules()):
        for conv_name, bn_name in pairs.get(type(module), ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if _foldable(conv, bn):
                fold_into_conv_(conv, bn)
                setattr(module, bn_name, bn_remainder(bn))
                folded += 1
        if isinstance(module, nn.Sequential) or _is_feature_dict(module):
            folded += _fold_sequential(module)
    return folded


def _is_feature_dict(module: nn.Module) -> bool:
    """timm's FeatureDictNet/FeatureListNet: a ModuleDict whose forward runs its children in order."""
    try:
        from timm.models import FeatureDictNet
    except ImportError:
        return False
    return isinstance(module, FeatureDictNet)


def _fold_sequential(sequence: nn.Module) -> int:
    """Fold Conv -> BN children that run one after the other (never a conv whose own output is
    returned as a feature map: timm's `return_layers`)."""
    names = list(sequence._modules)
    returned = set(getattr(sequence, "return_layers", {}) or {})
    folded = 0
    for first, second in zip(names, names[1:]):
        conv, bn = sequence._modules[first], sequence._modules[second]
        if first not in returned and _foldable(conv, bn):
            fold_into_conv_(conv, bn)
            sequence._modules[second] = bn_remainder(bn)
            folded += 1
    return folded
