"""The Backbone contract shared by every backbone family, and checkpoint-loading helpers.

A backbone maps an RGB image batch in [0, 1], shape (B, 3, H, W) with H and W multiples of 32, to a
list of feature maps, shallow to deep. `out_channels[i]` and `out_strides[i]` describe output i: it has
shape (B, out_channels[i], ceil(H / s), ceil(W / s)) with s = out_strides[i].

Families subclass `Backbone`, list their configurations in `variants` (lower-case keys) and accept
`out_strides` so that a detection YAML builds only the outputs it reads (an output norm that nobody
reads would receive no gradient, which stalls DDP).
"""

from __future__ import annotations

import logging
import re
from abc import ABCMeta, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

LOGGER = logging.getLogger("vitdet")


def normalise_variant_name(name: str) -> str:
    """'SA12', 'sa-12', 'Sa_12' -> 'sa12'; '128S' -> '128s'."""
    return re.sub(r"[\s_\-]", "", str(name)).lower()


@dataclass
class LoadReport:
    """What `load_pretrained` did with a checkpoint file.

    loaded:      our keys that received a value from the file
    missing:     our keys that received nothing (an error unless allowed: they stay random)
    fresh:       our keys that the official release never has (e.g. per-level output norms),
                 left at their initialisation on purpose
    unexpected:  file keys with no place in our module (after renaming)
    mismatched:  (key, file shape, our shape) for keys whose element counts differ
    ignored:     file keys dropped on purpose (the classifier head, index buffers rebuilt by us)
    """

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [
            f"{self.source}: loaded {len(self.loaded)} tensors",
            f"ignored {len(self.ignored)} (head/buffers)",
        ]
        if self.fresh:
            parts.append(f"{len(self.fresh)} not in the release, initialised fresh: {_short(self.fresh)}")
        if self.missing:
            parts.append(f"MISSING {len(self.missing)}: {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"UNEXPECTED {len(self.unexpected)}: {_short(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} {tuple(a)}->{tuple(b)}" for k, a, b in self.mismatched[:5]]
            parts.append(f"SHAPE MISMATCH {len(self.mismatched)}: {', '.join(shown)}")
        return "; ".join(parts)

    def raise_if_incomplete(self, allow_missing: bool = False) -> None:
        problems = bool(self.unexpected or self.mismatched or (self.missing and not allow_missing))
        if problems:
            raise RuntimeError(f"pretrained weights did not load cleanly. {self.summary()}")


def _short(keys: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def read_checkpoint(
    path: str | Path,
    top_level_keys: Iterable[str] = ("state_dict", "model"),
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Read an official release file without running code from it.

    Unwraps the first of `top_level_keys` present, strips `prefix` from keys that carry it (keys
    without it, such as mmpretrain's `head.*`, are kept as they are) and returns tensors only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with custom classes: refuse rather than execute it
        raise RuntimeError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({err}). Re-save its "
            "state_dict as plain tensors: torch.save(ckpt['model'], 'clean.pth')"
        ) from err
    if isinstance(obj, Mapping):
        for key in top_level_keys:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise RuntimeError(f"{path}: expected a state_dict (a mapping of tensors), found {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            state[key[len(prefix) :] if prefix and key.startswith(prefix) else key] = value
    return state


def load_state_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str = "",
    ignored: Sequence[str] = (),
    fresh: Sequence[str] = (),
) -> LoadReport:
    """Copy `state` (already renamed to our keys) into `module`, reshaping where element counts agree.

    `fresh` lists our keys that the release never contains; they are reported, not flagged missing.
    """
    ours = module.state_dict()
    report = LoadReport(source=source, ignored=list(ignored))
    fresh_set = set(fresh)
    with torch.no_grad():
        for key, value in state.items():
            if key not in ours:
                report.unexpected.append(key)
                continue
            target = ours[key]
            if target.numel() != value.numel():
                report.mismatched.append((key, tuple(value.shape), tuple(target.shape)))
                continue
            target.copy_(value.reshape(target.shape).to(target.dtype))
            report.loaded.append(key)
    got = set(report.loaded) | {k for k, _, _ in report.mismatched}
    for key in ours:
        if key in got or key.endswith("num_batches_tracked"):
            continue
        (report.fresh if key in fresh_set else report.missing).append(key)
    return report


class Backbone(nn.Module, metaclass=ABCMeta):
    """Base class of every backbone family (see the module docstring for the contract).

    Subclasses set `out_channels` and `out_strides` in `__init__` and implement `forward`;
    they override `reparameterize` when they have anything to fold and `load_pretrained`
    (usually through `_remap_official`) to read the authors' release files.
    """

    family: ClassVar[str] = ""
    variants: ClassVar[Mapping[str, Any]] = {}
    supported_strides: ClassVar[tuple[int, ...]] = (8, 16, 32)

    out_channels: tuple[int, ...]
    out_strides: tuple[int, ...]

    @classmethod
    def resolve_variant(cls, variant: str | None) -> str:
        """Match a variant name case-insensitively ('SA12', 'sa12', '128S'); error lists the known ones."""
        if variant is None:
            raise ValueError(f"{cls.family or cls.__name__}: a variant is required, one of {list(cls.variants)}")
        key = normalise_variant_name(variant)
        if key not in cls.variants:
            raise ValueError(
                f"{cls.family or cls.__name__}: unknown variant {variant!r}; known: {', '.join(cls.variants)}"
            )
        return key

    @classmethod
    def check_out_strides(cls, out_strides: Sequence[int] | None) -> tuple[int, ...]:
        """Validate a requested subset of `supported_strides` (None = all of them)."""
        if out_strides is None:
            return tuple(cls.supported_strides)
        wanted = tuple(sorted(int(s) for s in out_strides))
        bad = [s for s in wanted if s not in cls.supported_strides]
        if bad or not wanted:
            raise ValueError(
                f"{cls.family or cls.__name__}: cannot produce strides {bad or '()'}; "
                f"it produces {cls.supported_strides}"
            )
        return wanted

    def output_shape(self) -> dict[int, int]:
        """{stride: channels} of the outputs, shallow to deep (detectron2's output_shape)."""
        return dict(zip(self.out_strides, self.out_channels))

    @abstractmethod
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> one map per `out_strides` entry, shallow to deep."""

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters the optimiser must not decay, beyond biases
        and norm weights: layer scales, attention-bias tables, position encodings (timm convention)."""
        return set()

    def reparameterize(self) -> None:
        """Fold train-time structure into its inference form, in place; exact and idempotent."""

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Read the authors' release file into this module; families that have releases override it."""
        raise RuntimeError(f"{type(self).__name__} has no official weights to load ({path})")
