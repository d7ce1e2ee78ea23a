"""`Timm`: any timm model as a backbone node, by name.

    [-1, 1, Timm, [convnext_atto]]
    [-1, 1, Timm, [{model: convnext_atto, weights: path/to/model.safetensors, drop_path: 0.1}]]
    build_backbone("Timm", "convnext_atto", weights=..., normalize_input=True)

The node wraps timm's own `features_only=True` model (`self.body`), so the maps are exactly timm's:

- Slots by true stride. timm's `feature_info` lists every map of the model (reduction, channels,
  module); for each stride up to 32 the deepest map of that stride is declared (a model with several
  maps at one stride, e.g. a plain ViT, keeps the last). A probe forward (eval, no_grad, at
  PROBE_SIZE) checks that each map really has stride s (ceil(H / s) x ceil(W / s)); a stride that is
  not a power of two is an error naming the model. Strides above 32 are not built (no YAML slot).
- Channels come from the declaration; the YAML never types them.
- Only what the YAML reads is built: timm's `out_indices` stop at the deepest requested map, and its
  feature wrapper drops (or prunes) the rest.
- Input normalisation with the model's own `pretrained_cfg` mean/std (inputs arrive in [0, 1]).
- Channels-last outputs (Swin, MambaOut: timm's `output_fmt` NHWC) are returned as NCHW.
- Input sizes: the node passes `dynamic_img_size=True` where the model accepts it (ViTs, Swin, ...);
  a model that still cannot run at PROBE_SIZE is refused with the size it was built for. A model
  whose deep maps come out larger than ceil(H / s) when H / 32 is odd (MobileViT blocks round a map up
  to their patch size) gets its input zero-padded to a multiple of 64 and its maps cropped back; its
  maps then equal timm's own at sides that are multiples of 64 (elsewhere timm's own are not
  ceil(H / s) x ceil(W / s) at all).
- Plain (single-stride) ViTs: the stride-16 map of the last block goes through a simple feature
  pyramid (ViTDet, Li et al. 2022): stride 4 by two 2x transposed convs, 8 by one, 16 as is, 32 by a
  2x max-pool (ceil mode), each followed by a 1x1 and a 3x3 Conv+BN (`pyramid.stride<s>`). No timm
  checkpoint holds these layers: the load report lists them as fresh.

Options (YAML mapping keys or keyword arguments): `model` (the timm name, or the first positional
argument), `weights` (a timm classification checkpoint, .pth/.bin/.safetensors), `pretrained`
(let timm fetch its default weights; needs network), `drop_path` / `drop_path_rate` (timm's
stochastic depth), `pyramid_channels` (plain ViTs: channels of each pyramid level, default the
embedding width), `normalize_input`, and `timm_kwargs` (a mapping passed to `timm.create_model`).

`reparameterize()` runs timm's own reparameterisation (`fuse()` / `reparameterize()` of the blocks
that have one: RepViT, FastViT, MobileOne, ...) and folds the Conv+BN pairs known to be exact
(see foreign.py), then the pyramid's Conv+BN.
"""

from __future__ import annotations

import logging
import math
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Backbone, Feature, LoadReport, load_state_into
from .foreign import fold_conv_bn_pairs, read_weight_file, to_nchw
from .layers import ConvBN, reparameterize_modules

LOGGER = logging.getLogger("vitdet." + __name__)

PROBE_SIZE = (128, 96)  # (H, W): multiples of 32, not square, small enough for any model on a CPU
PAD_PROBE_SIZE = (128, 128)  # second probe, multiples of 64, for models whose odd deep maps grow
MAX_STRIDE = 32
PYRAMID_STRIDES = (4, 8, 16, 32)
REPRESENTATIVE = "convnext_atto"  # the model the contract tests build


def _timm():
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is in requirements.txt
        raise ImportError("the Timm backbone node needs timm: pip install timm") from err
    return timm


def timm_version() -> str:
    return _timm().__version__


class TimmModels(Mapping):
    """The `variants` of the Timm node: every model name the installed timm knows (a name may carry a
    pretrained tag, `vit_tiny_patch16_224.augreg_in21k`). Iterating lists the representative model
    only (what the contract tests build), not timm's whole zoo."""

    def __getitem__(self, name: str) -> str:
        if not isinstance(name, str) or not _timm().is_model(name.split(".")[0]):
            raise KeyError(name)
        return name

    def __iter__(self):
        return iter((REPRESENTATIVE,))

    def __len__(self) -> int:
        return 1

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True


@dataclass
class TimmProbe:
    """What the classification model of a timm name tells before the node is built."""

    features: list[Feature]              # module = timm's module name (classification naming)
    indices: dict[int, int]              # stride -> index into timm's feature_info
    channels_last: bool
    plain_width: int | None              # embedding width of a single-stride model (ViT), else None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    pad_multiple: int = 1                # input sides are zero-padded to this multiple (1: none)


class Timm(Backbone):
    """A timm model's feature maps at strides up to 32 (see the module docstring).

    forward: (B, 3, H, W) RGB in [0, 1] -> one (B, out_channels[i], ceil(H/s), ceil(W/s)) NCHW map per
    requested stride s, shallow to deep.
    """

    family = "Timm"
    variants: ClassVar[Mapping[str, Any]] = TimmModels()

    def __init__(self, variant: str | None = None, out_strides: Sequence[int] | None = None, *,
                 model: str | None = None, normalize_input: bool = True, pretrained: bool = False,
                 drop_path_rate: float = 0.0, drop_path: float | None = None,
                 pyramid_channels: int | None = None, timm_kwargs: Mapping[str, Any] | None = None) -> None:
        if variant is not None and model is not None and variant != model:
            raise ValueError(f"Timm: got two model names, {variant!r} and model={model!r}")
        name = self.resolve_variant(variant if variant is not None else model)
        # drop_path_rate (what the hyp key `drop_path` sets) wins over the YAML's `drop_path` alias
        rate = float(drop_path_rate or (drop_path or 0.0))
        probe = probe_model(name, rate, dict(timm_kwargs or {}))
        super().__init__(name, out_strides, normalize_input=normalize_input, probe=probe,
                         pyramid_channels=pyramid_channels)
        self.timm_name, self.drop_path_rate = name, rate
        self.input_statistics = (probe.mean, probe.std)
        self.input_mean.copy_(torch.tensor(probe.mean).view(1, 3, 1, 1))
        self.input_std.copy_(torch.tensor(probe.std).view(1, 3, 1, 1))
        self.channels_last = probe.channels_last
        self.pad_multiple = probe.pad_multiple
        self.plain = probe.plain_width is not None
        if self.plain:
            self.body = create_timm(name, probe.create_kwargs, features_only=True,
                                    out_indices=(probe.indices[16],), pretrained=pretrained)
            self.pyramid = SimpleFeaturePyramid(probe.plain_width, self.out_channels[0], self.out_strides)
            install_traceable_pos_embed(getattr(self.body, "model", self.body))
        else:
            indices = tuple(probe.indices[s] for s in self.out_strides)
            self.body = create_timm(name, probe.create_kwargs, features_only=True, out_indices=indices,
                                    pretrained=pretrained)
            self.pyramid = None
        self._use_body_module_names()

    # -- declaration ----------------------------------------------------------------------------
    @classmethod
    def resolve_variant(cls, variant: str | None) -> str:
        """The timm model name as written (timm names are case-sensitive and use underscores)."""
        if variant is None:
            raise ValueError("Timm: a model name is required, e.g. [-1, 1, Timm, [convnext_atto]]")
        name = str(variant)
        if name not in cls.variants:
            import difflib

            close = difflib.get_close_matches(name, _timm().list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"Timm: unknown variant {name!r}; known: {cls.variants_description()}{hint}")
        return name

    @classmethod
    def variants_description(cls) -> str:
        """What 'known variants' means for an open-ended family (error messages, contract tests)."""
        return f"any model of the installed timm {timm_version()} (timm.list_models())"

    @classmethod
    def declare_features(cls, config: str, probe: TimmProbe | None = None,
                         pyramid_channels: int | None = None) -> list[Feature]:
        """The probed maps (strides <= 32), or the pyramid levels of a plain ViT."""
        probe = probe or probe_model(config, 0.0, {})
        if probe.plain_width is None:
            return list(probe.features)
        width = pyramid_channels or probe.plain_width
        return [Feature(s, width, "body", f"pyramid.levels.stride{s}") for s in PYRAMID_STRIDES]

    def _describe(self) -> str:
        return f"{self.display_name} (timm {timm_version()})"

    def _use_body_module_names(self) -> None:
        """Re-point each declared feature at its module inside `self.body` (timm's feature wrapper
        renames `stages.1` to `stages_1`, or keeps it under `model.`)."""
        if self.plain:
            return
        present = dict(self.named_modules())
        renamed = _rename_features(self.feature_info, present)
        self.feature_info = tuple(replace(f, module=renamed[f.module]) for f in self.feature_info)
        self.out_features = tuple(replace(f, module=renamed[f.module]) for f in self.out_features)
        _drop_blocks_after(self, self.out_features[-1].module)
        self._trunk_built = self._built_trunk()

    # -- forward ----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = x.shape[-2:]
        multiple = self.pad_multiple
        if multiple > 1:  # zero (= mean colour) padding at the bottom/right, outputs cropped below
            x = nn.functional.pad(x, (0, -width % multiple, 0, -height % multiple))
        maps = list(self.body(x))
        if self.channels_last:
            maps = [to_nchw(m) for m in maps]
        if multiple > 1:
            maps = [m[..., :math.ceil(height / s), :math.ceil(width / s)]
                    for m, s in zip(maps, self.out_strides)]
        if self.pyramid is not None:
            return self.pyramid(maps[-1])
        return maps

    # -- inference form ---------------------------------------------------------------------------
    def reparameterize(self) -> None:
        """timm's own reparameterisation of the blocks that have one, then the exact Conv+BN folds,
        then the pyramid's Conv+BN. In place, idempotent."""
        from timm.models import reparameterize_model

        reparameterize_model(self.body, inplace=True)
        fold_conv_bn_pairs(self.body)
        if self.pyramid is not None:
            reparameterize_modules(self.pyramid)
        self._reparameterized = True

    def no_weight_decay(self) -> set[str]:
        """timm's own list (position embeddings, tokens, layer scales, bias tables), under our names."""
        inner = getattr(self.body, "model", None)
        source = inner if inner is not None and hasattr(inner, "no_weight_decay") else None
        names = set(source.no_weight_decay()) if source is not None else set()
        prefix = "body.model." if source is not None else "body."
        ours = {name for name, _ in self.named_parameters()}
        found = {f"{prefix}{n}" for n in names if f"{prefix}{n}" in ours}
        return found | {name for name in ours if _no_decay_name(name)}

    def layer_depths(self) -> tuple[dict[str, int], int]:
        """Depth indices for layer-wise lr decay from timm's own block grouping (`group_matcher(coarse=
        False)`: stem 0, then each block in order); N = the number of groups. Parameters timm's model
        does not have (the ViT pyramid) get N, like the neck. Falls back to the base rule for models
        without a matcher."""
        from timm.models import group_parameters

        classifier = self.classification_model()
        try:
            groups = group_parameters(classifier, classifier.group_matcher(coarse=False))
        except (AttributeError, NotImplementedError):
            return super().layer_depths()
        rank = {name: index for index, key in enumerate(sorted(groups)) for name in groups[key]}
        ours = dict(self.named_parameters())
        to_class = classification_names(ours, set(rank))
        total = len(groups)
        return {name: rank[to_class[name]] if name in to_class else total for name in ours}, total

    # -- weights ----------------------------------------------------------------------------------
    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load a timm classification checkpoint (.pth/.bin/.safetensors: the file timm's hub holds,
        or `torch.save(timm.create_model(name).state_dict())`). Head and unbuilt stages are ignored;
        a file in the authors' original layout goes through the model's own timm conversion
        (`checkpoint_filter_fn`) first; the pyramid of a plain ViT is reported fresh."""
        state = read_weight_file(path)
        classifier = self.classification_model()
        class_keys = set(classifier.state_dict())
        if any(key not in class_keys for key in state):
            state = _convert_original_layout(self.timm_name, state, classifier)
        ours_to_class = classification_names(self.state_dict(), class_keys)
        class_to_ours = {v: k for k, v in ours_to_class.items()}
        renamed = {class_to_ours.get(key, key): value for key, value in state.items()
                   if key in class_to_ours or key not in class_keys}
        ignored = [key for key in state if key in class_keys and key not in class_to_ours]
        fresh = [key for key in self.state_dict() if key.startswith("pyramid.")]
        return load_state_into(self, renamed, source=str(path), ignored=ignored, fresh=fresh)

    def classification_model(self) -> nn.Module:
        """A fresh (random) timm classification model of this name and options, on the CPU."""
        probe_kwargs = dict(self._feature_options["probe"].create_kwargs)
        return create_timm(self.timm_name, probe_kwargs)

    def static_export_only(self) -> str | None:
        """Why this node cannot be exported with dynamic shapes (None: it can). A plain ViT resamples its
        position embeddings to each input's grid with antialiased bicubic interpolation, which ONNX has
        no operator for; its export takes the table of the exported size as a constant."""
        vit = getattr(self.body, "model", self.body)
        if self.plain and hasattr(vit, "_resampled_pos_embed"):
            return (f"Timm {self.timm_name} resamples its position embeddings to each input size with "
                    "antialiased bicubic interpolation, which ONNX cannot express")
        return None

    def export_options(self) -> dict[str, Any]:
        """What a checkpoint records about this node: the timm name, version and options."""
        return {"timm_model": self.timm_name, "timm_version": timm_version(),
                "drop_path_rate": self.drop_path_rate}


# ---------------------------------------------------------------------------------------------
# probing and building timm models
# ---------------------------------------------------------------------------------------------

def create_timm(name: str, create_kwargs: Mapping[str, Any], pretrained: bool = False,
                **extra: Any) -> nn.Module:
    """timm.create_model with our options; `pretrained=True` without network says how to pass a file."""
    timm = _timm()
    try:
        return timm.create_model(name, pretrained=pretrained, **create_kwargs, **extra)
    except Exception as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"Timm {name}: timm could not fetch its pretrained weights ({type(err).__name__}: {err}). "
            f"Offline, download the classification checkpoint once (e.g. model.safetensors from "
            f"https://huggingface.co/timm/{name.split('.')[0]}) and pass it as a file: "
            f"[-1, 1, Timm, [{{model: {name}, weights: path/to/model.safetensors}}]] or "
            f"--backbone-weights path/to/model.safetensors") from err


def build_classifier(name: str, drop_path_rate: float, extra: dict[str, Any]
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """(classification model, the create kwargs it took): dynamic_img_size=True where the model
    accepts it, drop_path_rate when > 0 (an error naming the model when it has none)."""
    kwargs = dict(extra)
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    candidates = [kwargs] if "dynamic_img_size" in kwargs else [{**kwargs, "dynamic_img_size": True}, kwargs]
    for position, trial in enumerate(candidates):
        try:
            return create_timm(name, trial), trial
        except TypeError as err:
            if "dynamic_img_size" in str(err) and position + 1 < len(candidates):
                continue
            if "drop_path_rate" in str(err):
                raise ValueError(f"Timm {name}: this timm model has no stochastic depth "
                                 f"(drop_path_rate); remove drop_path") from err
            raise
    raise AssertionError("unreachable")


def probe_model(name: str, drop_path_rate: float, extra: dict[str, Any]) -> TimmProbe:
    """Build the classification model once and read its maps: declared strides, channels, layout."""
    model, kwargs = build_classifier(name, drop_path_rate, extra)
    model.eval()
    info = [dict(entry) for entry in getattr(model, "feature_info", [])]
    if not info:
        raise ValueError(f"Timm {name}: timm lists no feature maps for this model (no feature_info); "
                         "it cannot serve as a backbone")
    reductions = [int(entry["reduction"]) for entry in info]
    channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
    indices: dict[int, int] = {}
    for index, stride in enumerate(reductions):
        if stride <= MAX_STRIDE:
            indices[stride] = index  # the deepest map of each stride
    bad = sorted({s for s in indices if 2 ** round(math.log2(s)) != s})
    if bad:
        raise ValueError(f"Timm {name}: feature strides {bad} are not powers of two (strides "
                         f"{sorted(set(reductions))}); the YAML slots need strides 2, 4, 8, 16, 32")
    pad_multiple = 1
    modules = [entry["module"] for entry in info]
    for size in (PROBE_SIZE, PAD_PROBE_SIZE):
        shapes = _probe_shapes(name, model, modules, kwargs, size)
        problem = _probe_stride_problem(name, info, shapes, indices, channels_last, size)
        if problem is None:
            break
        pad_multiple = 2 * MAX_STRIDE  # e.g. MobileViT blocks round odd maps up to their patch size
    if problem is not None:
        raise ValueError(problem)
    mean, std = _statistics(model)
    plain = len(set(reductions)) == 1 and reductions[0] == 16
    features = [Feature(s, int(info[i]["num_chs"]), info[i]["module"]) for s, i in sorted(indices.items())]
    return TimmProbe(features, indices, channels_last, int(info[-1]["num_chs"]) if plain else None,
                     mean, std, kwargs, pad_multiple)


def _probe_shapes(name: str, model: nn.Module, modules: list[str], kwargs: dict,
                  size: tuple[int, int]) -> dict[str, tuple]:
    """{module name: output shape} of one no-grad forward at `size`, or a refusal naming the size
    the model needs."""
    found = dict(model.named_modules())
    shapes: dict[str, tuple] = {}
    hooks = []

    def record(key: str):
        def hook(module, args, output) -> None:  # returning None keeps the module's output
            shapes.setdefault(key, tuple(_first(output).shape))
        return hook

    for module_name in modules:
        if module_name in found:
            hooks.append(found[module_name].register_forward_hook(record(module_name)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    except Exception as err:
        built = model.pretrained_cfg.get("input_size", (3, "?", "?"))[1:]
        dynamic = " even with dynamic_img_size=True" if kwargs.get("dynamic_img_size") else \
            " and timm offers no dynamic_img_size option for it"
        raise ValueError(f"Timm {name}: cannot run at {size[0]}x{size[1]}{dynamic} (it is "
                         f"built for {built[0]}x{built[1]}: fixed position embeddings or attention tables); "
                         f"detection needs any multiple of 32. Error: {type(err).__name__}: {err}") from err
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _probe_stride_problem(name: str, info: list[dict], shapes: dict[str, tuple], indices: dict[int, int],
                          channels_last: bool, size: tuple[int, int]) -> str | None:
    """None when each declared 4-D map is ceil(H / s) x ceil(W / s) at input `size`, else the problem."""
    for stride, index in indices.items():
        shape = shapes.get(info[index]["module"])
        if shape is None or len(shape) != 4:
            continue  # tokens (ViT blocks) or a module not reached by the hook: timm's wrapper maps them
        h, w = (shape[1], shape[2]) if channels_last else (shape[2], shape[3])
        expected = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        if (h, w) != expected:
            return (f"Timm {name}: map {info[index]['module']} is declared at stride {stride} but is "
                    f"{h}x{w} for a {size[0]}x{size[1]} input (expected {expected[0]}x{expected[1]})")
    return None


def _statistics(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def _body_module_name(module: str, present: Mapping[str, nn.Module]) -> str | None:
    """Our name of timm module `module` inside the feature wrapper `body` (None: not built)."""
    for candidate in _wrapper_names(module):
        if candidate in present:
            return candidate
    return None


def _wrapper_names(module: str) -> list[str]:
    """The names timm's feature wrappers give module `module`: as is, joined (`stages_1`), under model."""
    first, _, rest = module.partition(".")
    names = [f"body.{module}", f"body.model.{module}"]
    if rest:
        head, _, tail = rest.partition(".")
        names.append(f"body.{first}_{head}" + (f".{tail}" if tail else ""))
    return names


def _rename_features(features: Sequence[Feature], present: Mapping[str, nn.Module]) -> dict[str, str]:
    """{timm module: our module} for every declared feature; unbuilt (deeper) ones take the naming
    style of the built ones."""
    found = {f.module: _body_module_name(f.module, present) for f in features}
    styles = [_wrapper_names(m).index(name) for m, name in found.items() if name is not None]
    if not styles:
        raise RuntimeError(f"none of the timm feature modules {list(found)} is in the feature wrapper")
    def guess(module: str) -> str:
        names = _wrapper_names(module)
        return names[styles[-1]] if styles[-1] < len(names) else names[0]

    return {m: name if name is not None else guess(m) for m, name in found.items()}


def _drop_blocks_after(root: nn.Module, deepest: str) -> None:
    """Delete the blocks after `deepest` in its Sequential (timm's EfficientNet/MobileNetV3 feature
    classes build every block, even those after the deepest requested map, which would then train
    nothing and stall DDP)."""
    parent_name, _, index = deepest.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else None
    if not isinstance(parent, nn.Sequential) or index not in parent._modules:
        return
    names = list(parent._modules)
    for name in names[names.index(index) + 1:]:
        del parent._modules[name]


def classification_names(ours: Mapping[str, Any], class_keys: set[str]) -> dict[str, str]:
    """{our key: timm classification key} for our keys under `body.` that have one.

    timm's feature wrappers keep the classification modules but rename them: FeatureListNet joins the
    first two levels of a Sequential (`stages.1.x` -> `stages_1.x`), FeatureGetterNet keeps the model
    under `model.`. Each candidate is tried against the classification model's own keys.
    """
    mapping = {}
    for key in ours:
        if not key.startswith("body."):
            continue
        inner = key[len("body."):]
        candidates = [inner, inner[len("model."):] if inner.startswith("model.") else None]
        first, _, rest = inner.partition(".")
        for position, char in enumerate(first):
            if char == "_":
                candidates.append(f"{first[:position]}.{first[position + 1:]}" + (f".{rest}" if rest else ""))
        match = next((c for c in candidates if c is not None and c in class_keys), None)
        if match is not None:
            mapping[key] = match
    return mapping


def _convert_original_layout(name: str, state: dict[str, torch.Tensor], classifier: nn.Module
                             ) -> dict[str, torch.Tensor]:
    """Apply the model module's `checkpoint_filter_fn` (timm's converter from the authors' layout)."""
    module = sys.modules.get(type(classifier).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is None:
        return state
    try:
        converted = convert(dict(state), classifier)
    except Exception as err:  # noqa: BLE001 - a file of another model: the load report will say so
        LOGGER.info(f"Timm {name}: timm's checkpoint_filter_fn cannot convert the file ({err}); "
                    "loading it as is")
        return state
    LOGGER.info(f"Timm {name}: converted the checkpoint with timm's {module.__name__}.checkpoint_filter_fn")
    return {k: v for k, v in converted.items() if isinstance(v, torch.Tensor)}


def _no_decay_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith(("gamma", "layer_scale", "ls")) or "relative_position_bias_table" in name \
        or leaf in {"pos_embed", "cls_token", "reg_token"}


# ---------------------------------------------------------------------------------------------
# ONNX / TorchScript export of dynamic-size ViTs
# ---------------------------------------------------------------------------------------------

def install_traceable_pos_embed(vit: nn.Module) -> None:
    """Make a dynamic-size timm ViT traceable for export (no-op for other modules).

    timm resamples the position embeddings to each input's grid with antialiased bicubic
    interpolation, which has no ONNX operator. Eager calls keep timm's code; each no-grad eager call
    also remembers the resampled table for its grid (one entry, keyed by grid, dtype, device and the
    parameter's version, so any weight update invalidates it). A traced call (export) uses the table
    remembered for its grid as a constant, so an export works at the size the exporter verified
    eagerly first; a dynamic-shape export of such a model cannot follow other sizes.
    """
    if not (hasattr(vit, "_pos_embed") and getattr(vit, "dynamic_img_size", False)
            and getattr(vit, "pos_embed", None) is not None):
        return
    vit._resampled_pos_embed = {}
    vit._pos_embed = types.MethodType(_traceable_pos_embed, vit)  # bound: deepcopy rebinds it to the copy


def _traceable_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's `_pos_embed` (x: (B, H, W, C) patch tokens), with a constant table while traced."""
    from timm.layers import resample_abs_pos_embed

    timm_pos_embed = type(self)._pos_embed
    batch, height, width, channels = x.shape
    key = (int(height), int(width), self.pos_embed.dtype, self.pos_embed.device)
    if not torch.jit.is_tracing():
        if not torch.is_grad_enabled():
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            table = resample_abs_pos_embed(self.pos_embed, new_size=key[:2],
                                           old_size=self.patch_embed.grid_size, num_prefix_tokens=prefix)
            self._resampled_pos_embed = {key: (self.pos_embed._version, table.detach())}
        return timm_pos_embed(self, x)
    version, table = self._resampled_pos_embed.get(key, (None, None))
    if table is None or version != self.pos_embed._version:
        raise RuntimeError(f"tracing a dynamic-size ViT at grid {key[:2]}: run it once eagerly under no_grad "
                           "at this input size first (the exporter's verification does), so that its "
                           "resampled position embeddings exist as a constant")
    saved = self._parameters["pos_embed"]
    self._parameters["pos_embed"] = nn.Parameter(table, requires_grad=False)
    self.dynamic_img_size = False  # timm's path for a table of the right size
    try:
        return timm_pos_embed(self, x.reshape(batch, height * width, channels))
    finally:
        self._parameters["pos_embed"] = saved
        self.dynamic_img_size = True


# ---------------------------------------------------------------------------------------------
# the simple feature pyramid of plain ViTs
# ---------------------------------------------------------------------------------------------

class PyramidLevel(nn.Module):
    """(B, C, H16, W16) -> (B, out, H16 * 16 / s, W16 * 16 / s) for s in 4, 8, 16, 32 (ceil for 32)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride == 4:
            self.rescale = nn.Sequential(nn.ConvTranspose2d(in_channels, in_channels // 2, 2, 2),
                                         nn.BatchNorm2d(in_channels // 2), nn.GELU(),
                                         nn.ConvTranspose2d(in_channels // 2, in_channels // 4, 2, 2))
            width = in_channels // 4
        elif stride == 8:
            self.rescale, width = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, 2), in_channels // 2
        elif stride == 16:
            self.rescale, width = nn.Identity(), in_channels
        elif stride == 32:
            self.rescale, width = nn.MaxPool2d(2, ceil_mode=True), in_channels
        else:
            raise ValueError(f"simple feature pyramid: stride {stride} not in {PYRAMID_STRIDES}")
        self.reduce = ConvBN(width, out_channels, 1)
        self.mix = ConvBN(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.reduce(self.rescale(x)))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a single stride-16 map: one `PyramidLevel` per stride."""

    def __init__(self, in_channels: int, out_channels: int, strides: Sequence[int]) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.levels = nn.ModuleDict({f"stride{s}": PyramidLevel(in_channels, out_channels, s)
                                     for s in strides})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.levels[f"stride{s}"](x) for s in self.strides]
