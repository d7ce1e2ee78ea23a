"""The Backbone template shared by every backbone family, and checkpoint-loading helpers.

A backbone maps an RGB image batch in [0, 1], shape (B, 3, H, W), to a list of feature maps, shallow
to deep: output i has shape (B, out_channels[i], ceil(H / s), ceil(W / s)) with s = out_strides[i].

Adding a family takes one file of blocks and one short family file that subclasses `Backbone`:

    class MyNet(Backbone):
        family = "MyNet"                                  # the YAML name
        variants = {"s": MyNetConfig(...), "m": ...}      # lower-case keys, any config object

        @classmethod
        def declare_features(cls, config):                # every map the full model can return
            return [Feature(8, config.widths[0], "stages.0"), Feature(16, config.widths[1], "stages.1"),
                    Feature(32, config.widths[2], "stages.2")]

        def __init__(self, variant, out_strides=None, normalize_input=True):
            super().__init__(variant, out_strides, normalize_input=normalize_input)
            self.stem = ...
            self.stages = nn.ModuleList(make_stage(self.config, i) for i in range(self.num_built("stages")))

        def forward_features(self, x):                    # x is already normalised
            ...  # return the maps of self.out_features, shallow to deep

and one line in `models/backbones/__init__.py`. From the declaration the base class derives
`out_strides`/`out_channels` for the requested strides (and the error for one it cannot produce),
which trunk modules to build (`num_built`: nothing deeper than the deepest requested map),
which checkpoint keys belong to parts not built (`split_unbuilt`, so `load_pretrained` ignores them),
which output-module keys a release may lack (`fresh_output_keys`), ImageNet input normalisation
inside `forward` (buffers `input_mean`/`input_std`, switched off with `normalize_input=False`), and
`reparameterize()`/`is_reparameterized` through the shared fuse walker (`layers.py`): a family makes
a block foldable by giving it a `reparameterize()` method, and does not override the backbone's.
"""

from __future__ import annotations

import logging
import math
import re
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .layers import IMAGENET_MEAN, IMAGENET_STD, reparameterize_modules

LOGGER = logging.getLogger("vitdet." + __name__)


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
    resized:     file keys whose tensor was resized to our shape (attention-bias tables trained for
                 another map or window size)
    """

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [
            f"{self.source}: loaded {len(self.loaded)} tensors",
            f"ignored {len(self.ignored)} (head/buffers)",
        ]
        if self.resized:
            parts.append(f"resized {len(self.resized)} tables: {_short(self.resized)}")
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
        raise RuntimeError(f"{path}: expected a state_dict (a mapping of tensors), "
                           f"found {type(obj).__name__}")
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


@dataclass(frozen=True)
class Feature:
    """One map a backbone family can return (timm's `feature_info` entry).

    stride:        input pixels per map cell, a power of two
    channels:      channels of the map
    module:        dotted name of the trunk module whose output the map is, e.g. "stages.2"
    output_module: dotted name of a module applied to this map only when it is requested (a
                   per-output norm such as "out_norms.stride8"), None when the map is returned as is
    """

    stride: int
    channels: int
    module: str
    output_module: str | None = None


class Backbone(nn.Module, metaclass=ABCMeta):
    """Base class and template of every backbone family (see the module docstring).

    A family declares `family`, `variants`, `declare_features` (and `trunk` when some trunk modules
    produce no returned map) and implements `forward_features`; it overrides `load_pretrained` to read
    the authors' release files and `no_weight_decay` to name layer scales, bias tables and the like.

    Derived here, after `super().__init__(variant, out_strides, normalize_input=..., **options)`
    (options go to `declare_features`): `variant`, `config`, `feature_info` (every declared map),
    `out_features` (the requested ones), `out_strides`, `out_channels`, `supported_strides`.
    """

    family: ClassVar[str] = ""
    variants: ClassVar[Mapping[str, Any]] = {}
    # Trunk modules in forward order, when it holds modules that return no map (LeViT's last stem
    # conv); by default the trunk is the `module` of each declared feature.
    trunk: ClassVar[tuple[str, ...]] = ()
    # (mean, std) per RGB channel for inputs in [0, 1]: what the released weights were trained with.
    input_statistics: ClassVar[tuple[tuple[float, ...], tuple[float, ...]]] = (IMAGENET_MEAN, IMAGENET_STD)

    out_channels: tuple[int, ...]
    out_strides: tuple[int, ...]

    def __init__(self, variant: str | None, out_strides: Sequence[int] | None = None, *,
                 normalize_input: bool = True, **feature_options: Any) -> None:
        super().__init__()
        self.variant = self.resolve_variant(variant)
        self.config = self.variants[self.variant]
        self._feature_options = dict(feature_options)
        self.feature_info = self._checked_features(self.declare_features(self.config, **feature_options))
        self.supported_strides = tuple(feature.stride for feature in self.feature_info)
        self.out_features = self._select_features(out_strides)
        self.out_strides = tuple(feature.stride for feature in self.out_features)
        self.out_channels = tuple(feature.channels for feature in self.out_features)
        self._trunk_built = self._built_trunk()
        self.normalize_input = bool(normalize_input)
        mean, std = self.input_statistics
        # Non-persistent: not in the state_dict (official layouts stay as released), but they follow
        # .to(dtype/device). Registered even when off, so the switch can be flipped on a built model.
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._reparameterized = False

    # -- what a family declares ---------------------------------------------------------------
    @classmethod
    @abstractmethod
    def declare_features(cls, config: Any, **options: Any) -> Sequence[Feature]:
        """Every map the full model of `config` can return, shallow to deep (strides rising)."""

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised (B, 3, H, W) input -> the maps of `out_features`, shallow to deep."""

    # -- variants and features --------------------------------------------------------------------
    @classmethod
    def resolve_variant(cls, variant: str | None) -> str:
        """Match a variant name case-insensitively ('SA12', 'sa12', '128S'); error lists the known ones."""
        if variant is None:
            raise ValueError(f"{cls.family or cls.__name__}: a variant is required, one of "
                             f"{list(cls.variants)}")
        key = normalise_variant_name(variant)
        if key not in cls.variants:
            raise ValueError(
                f"{cls.family or cls.__name__}: unknown variant {variant!r}; known: {', '.join(cls.variants)}"
            )
        return key

    @property
    def display_name(self) -> str:
        return f"{self.family or type(self).__name__}-{self.variant}"

    def _checked_features(self, features: Sequence[Feature]) -> tuple[Feature, ...]:
        """The declaration, validated once so that a new family's mistakes fail at build time."""
        features = tuple(features)
        strides = [feature.stride for feature in features]
        if not features or strides != sorted(set(strides)):
            raise TypeError(f"{self.display_name}: declare_features must list maps with rising, distinct "
                            f"strides, got {strides}")
        for feature in features:
            if feature.stride < 1 or 2 ** round(math.log2(feature.stride)) != feature.stride:
                raise TypeError(f"{self.display_name}: declared stride {feature.stride} is not a power "
                                "of two")
            if self.trunk and feature.module not in self.trunk:
                raise TypeError(f"{self.display_name}: declared module {feature.module!r} is not in the "
                                f"trunk {self.trunk}")
        return features

    def _select_features(self, out_strides: Sequence[int] | None) -> tuple[Feature, ...]:
        """The declared features of the requested strides (None = all), shallow to deep."""
        if out_strides is None:
            return self.feature_info
        wanted = sorted(int(s) for s in out_strides)
        by_stride = {feature.stride: feature for feature in self.feature_info}
        bad = [s for s in wanted if s not in by_stride]
        if bad or not wanted or len(set(wanted)) != len(wanted):
            shown = f" {bad}" if bad else ""  # empty or repeated requests have no bad stride to show
            raise ValueError(f"{self._describe()}: cannot produce strides{shown} (requested "
                             f"{list(out_strides)}); it produces {self.supported_strides}")
        return tuple(by_stride[s] for s in wanted)

    def _describe(self) -> str:
        """Name plus the feature options in effect (e.g. a layout), for error messages."""
        options = ", ".join(f"{key}={value!r}" for key, value in self._feature_options.items())
        return f"{self.display_name} ({options})" if options else self.display_name

    def output_shape(self) -> dict[int, int]:
        """{stride: channels} of the outputs, shallow to deep (detectron2's output_shape)."""
        return dict(zip(self.out_strides, self.out_channels))

    # -- what to build ------------------------------------------------------------------------------
    def _trunk_order(self) -> tuple[str, ...]:
        return self.trunk or tuple(dict.fromkeys(feature.module for feature in self.feature_info))

    def _built_trunk(self) -> tuple[str, ...]:
        trunk = self._trunk_order()
        return trunk[: trunk.index(self.out_features[-1].module) + 1]

    def num_built(self, prefix: str) -> int:
        """How many trunk modules named `prefix.0`, `prefix.1`, ... this instance builds: those up to
        the module of the deepest requested map (a family builds its stages 0..num_built("stages")-1;
        output modules are built for `out_features`)."""
        pattern = re.compile(re.escape(prefix) + r"\.\d+")
        return sum(1 for name in self._trunk_built if pattern.fullmatch(name))

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> one map per `out_strides` entry, shallow to deep."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.display_name} expects a (B, 3, H, W) RGB batch, got shape "
                             f"{tuple(x.shape)}")
        if self.normalize_input:
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        return self.forward_features(x)

    # -- inference form ---------------------------------------------------------------------------
    @property
    def is_reparameterized(self) -> bool:
        """True once `reparameterize()` has run (or a deploy release was loaded)."""
        return self._reparameterized

    def reparameterize(self) -> None:
        """Fold every train-time structure into its inference form, in place: exact for eval-mode
        outputs (BatchNorm running statistics are folded), idempotent, a no-op where nothing folds.
        Families do not override this; their foldable blocks implement `reparameterize()`."""
        reparameterize_modules(self)
        self._reparameterized = True

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters the optimiser must not decay, beyond biases
        and norm weights: layer scales, attention-bias tables, position encodings (timm convention)."""
        return set()

    def layer_depths(self) -> tuple[dict[str, int], int]:
        """({parameter name: depth index}, N) for layer-wise learning-rate decay (BEiT, ViTDet).

        The residual blocks (`stages.<s>. ... blocks.<b>.`; the parallel paths of MPViT share their
        block numbers) are numbered 1..N-1 in (stage, block) order; parameters before the first block
        (the stem) get 0; other parameters of a stage (patch embedding, downsampling, position
        encoding, MPViT's local path and aggregation) take the nearest block of their stage in
        registration order, the following one when there is one; parameters after the last stage
        (per-output norms, which no release holds) get N, the neck's index (full learning rate).
        """
        entries = []  # (name, stage or None, block key or None)
        for name, _ in self.named_parameters():
            stage = re.match(r"stages\.(\d+)\.", name)
            block = re.match(r"stages\.(\d+)\.(?:.*\.)?blocks\.(\d+)\.", name)
            entries.append((name, int(stage[1]) if stage else None,
                            (int(block[1]), int(block[2])) if block else None))
        keys = sorted({key for _, _, key in entries if key is not None})
        index = {key: i + 1 for i, key in enumerate(keys)}
        total = len(keys) + 1
        depths: dict[str, int] = {}
        for position, (name, stage, key) in enumerate(entries):
            if key is not None:
                depths[name] = index[key]
            elif stage is None:
                depths[name] = 0 if not any(k for _, _, k in entries[:position]) else total
            else:
                after = [index[k] for _, s, k in entries[position:] if k is not None and s == stage]
                before = [index[k] for _, s, k in entries[:position] if k is not None and s == stage]
                later = [index[k] for k in keys if k[0] > stage]  # a stage without blocks of its own
                depths[name] = (after or before[-1:] or later or [total])[0]
        return depths, total

    # -- pretrained weights -----------------------------------------------------------------------
    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Read the authors' release file into this module; families that have releases override it."""
        raise RuntimeError(f"{type(self).__name__} has no official weights to load ({path})")

    def _declared_parts(self) -> list[str]:
        outputs = [feature.output_module for feature in self.feature_info if feature.output_module]
        return [*self._trunk_order(), *outputs]

    def _unbuilt_parts(self) -> list[str]:
        """Declared modules this instance does not have (deeper trunk, maps not requested, options off)."""
        present = dict(self.named_modules())
        return [name for name in self._declared_parts() if name not in present]

    def split_unbuilt(self, state: Mapping[str, torch.Tensor],
                      rename: Callable[[str], str | None] | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """(kept tensors, dropped keys): the tensors of `state` whose key, renamed to ours by `rename`
        (identity by default; None = no name of ours), lies inside a declared part this instance does
        not build. Dropped keys are reported under the file's names, as `LoadReport.ignored` wants."""
        prefixes = tuple(f"{name}." for name in self._unbuilt_parts())
        kept, dropped = {}, []
        for key, value in state.items():
            ours = rename(key) if rename is not None else key
            if prefixes and ours is not None and ours.startswith(prefixes):
                dropped.append(key)
            else:
                kept[key] = value
        return kept, dropped

    def fresh_output_keys(self, loaded: Iterable[str]) -> list[str]:
        """Our keys of built output modules (per-output norms) that `loaded` lacks: releases usually
        hold only the classifier's last norm, so the others start from their initialisation."""
        loaded = set(loaded)
        prefixes = tuple(f"{f.output_module}." for f in self.out_features if f.output_module)
        return [key for key in self.state_dict() if prefixes and key.startswith(prefixes)
                and key not in loaded and not key.endswith("num_batches_tracked")]

    def finish_loading(self, state: Mapping[str, torch.Tensor], path: str | Path, ignored: Sequence[str] = (),
                       unbuilt: Sequence[str] = ()) -> LoadReport:
        """The shared tail of `load_pretrained`: log what is skipped or fresh, copy `state` (our keys)."""
        fresh = self.fresh_output_keys(state)
        if unbuilt:
            LOGGER.info(f"{self.display_name}: ignoring {len(unbuilt)} tensors of {path} that belong to "
                        f"parts not built for out_strides {self.out_strides}")
        if fresh:
            strides = [f.stride for f in self.out_features
                       if f.output_module and any(key.startswith(f"{f.output_module}.") for key in fresh)]
            LOGGER.info(f"{self.display_name}: {path} has no tensors for the output modules of strides "
                        f"{strides}; they start fresh (as initialised)")
        return load_state_into(self, state, source=str(path), ignored=[*ignored, *unbuilt], fresh=fresh)
