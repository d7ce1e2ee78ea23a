"""`TorchVision`: a torchvision classification CNN as a backbone node, by name.

    [-1, 1, TorchVision, [resnet18]]
    [-1, 1, TorchVision, [{model: efficientnet_b0, weights: IMAGENET1K_V1}]]   # enum name: needs network
    [-1, 1, TorchVision, [{model: convnext_tiny, weights: path/to/convnext_tiny.pth}]]

No child indices to pick: the node finds the model's trunk (its `features` Sequential, or else its
top-level children up to the global pool, with top-level Sequentials such as RegNet's `trunk_output`
opened one level) and measures each trunk module's stride with a probe forward (eval, no_grad, at
PROBE_SIZE). For each stride up to 32 the deepest module of that stride is declared. The probe also
checks that running the trunk modules one after the other gives what the model's own forward gives
at its last trunk module; a model whose forward is not such a chain (Inception's auxiliary branches,
ViTs' token reshapes, Swin's channels-last stages) is refused with its name.

The torchvision module is kept under `model.` with its own names, so the classification state_dict
loads with a "model." prefix; the classifier and the trunk deeper than the deepest requested map are
deleted (not built). `weights:` is a local file (.pth/.safetensors of the classification model) or the
name of a torchvision weights enum member (IMAGENET1K_V1, DEFAULT, ...), which torchvision downloads.
Inputs in [0, 1] are normalised with ImageNet mean/std (what torchvision's classification weights
expect). `reparameterize()` folds the exact Conv+BN pairs (foreign.py) in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .base import Backbone, Feature, LoadReport, load_state_into
from .foreign import fold_conv_bn_pairs, known_pairs, read_weight_file

PROBE_SIZE = (128, 96)
MAX_STRIDE = 32
POOL_NAMES = ("avgpool", "global_pool", "pool", "classifier", "fc", "head", "heads")
REPRESENTATIVE = "resnet18"


def _models():
    import torchvision.models

    return torchvision.models


class TorchVisionModels:
    """The variants of the TorchVision node: every classification model name of the installed
    torchvision (`torchvision.models.list_models(module=torchvision.models)`); iterating lists the
    representative model only (what the contract tests build)."""

    def __getitem__(self, name: str) -> str:
        if name not in self:
            raise KeyError(name)
        return name

    def __contains__(self, name: object) -> bool:
        models = _models()
        return isinstance(name, str) and name in models.list_models(module=models)

    def __iter__(self):
        return iter((REPRESENTATIVE,))

    def __len__(self) -> int:
        return 1


def trunk_paths(model: nn.Module) -> list[str]:
    """Dotted names of the modules the classification forward runs one after the other before its
    global pool: `features.0`, `features.1`, ... or `conv1`, `bn1`, ..., `layer4`."""
    children = dict(model.named_children())
    if isinstance(children.get("features"), nn.Sequential):
        return [f"features.{name}" for name, _ in children["features"].named_children()]
    paths = []
    for name, child in children.items():
        if name in POOL_NAMES:
            break
        if isinstance(child, nn.Sequential) and not name.startswith("layer"):
            paths += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            paths.append(name)
    return paths


class TorchVision(Backbone):
    """A torchvision classification CNN's maps at strides up to 32 (see the module docstring).

    forward: (B, 3, H, W) RGB in [0, 1] -> one (B, out_channels[i], ceil(H/s), ceil(W/s)) map per
    requested stride s, shallow to deep.
    """

    family = "TorchVision"
    variants = TorchVisionModels()

    def __init__(self, variant: str | None = None, out_strides: Sequence[int] | None = None, *,
                 model: str | None = None, normalize_input: bool = True) -> None:
        if variant is not None and model is not None and variant != model:
            raise ValueError(f"TorchVision: got two model names, {variant!r} and model={model!r}")
        name = self.resolve_variant(variant if variant is not None else model)
        full = _models().get_model(name, weights=None).eval()
        features, paths = probe_trunk(name, full)
        super().__init__(name, out_strides, normalize_input=normalize_input, probed=tuple(features))
        self.model_name = name
        deepest = paths.index(self.out_features[-1].module[len("model."):])
        self.chain = paths[: deepest + 1]
        self.model = prune_to(full, self.chain)
        self._out_paths = {f.module[len("model."):] for f in self.out_features}

    @classmethod
    def resolve_variant(cls, variant: str | None) -> str:
        if variant is None:
            raise ValueError("TorchVision: a model name is required, e.g. [-1, 1, TorchVision, [resnet18]]")
        name = str(variant)
        if name not in cls.variants:
            raise ValueError(f"TorchVision: unknown variant {name!r}; known: {cls.variants_description()}")
        return name

    @classmethod
    def variants_description(cls) -> str:
        import torchvision

        return f"any classification model of the installed torchvision {torchvision.__version__} " \
               "(torchvision.models.list_models())"

    @classmethod
    def declare_features(cls, config: str, probed: tuple[Feature, ...] = ()) -> list[Feature]:
        return list(probed) if probed else probe_trunk(config, _models().get_model(config).eval())[0]

    def _describe(self) -> str:
        return self.display_name

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for path in self.chain:
            x = self.model.get_submodule(path)(x)
            if path in self._out_paths:
                maps.append(x)
        return maps

    def reparameterize(self) -> None:
        """Fold the exact Conv+BN pairs (torchvision's Conv-BN-act Sequentials, ResNet blocks, and
        consecutive Conv -> BN trunk modules such as ResNet's conv1 -> bn1), in place."""
        pairs = dict(known_pairs())
        try:
            from torchvision.models import resnet

            pairs[resnet.BasicBlock] = [("conv1", "bn1"), ("conv2", "bn2")]
            pairs[resnet.Bottleneck] = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
            pairs[type(self.model)] = _consecutive_top_level_pairs(self.model, self.chain, self._out_paths)
        except ImportError:  # pragma: no cover
            pass
        fold_conv_bn_pairs(self.model, pairs)
        self._reparameterized = True

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """A local classification checkpoint file, or a torchvision weights enum member name
        (IMAGENET1K_V1, DEFAULT, ...; downloaded by torchvision, so it needs network)."""
        state = self._read_weights(path)
        present = set(self.state_dict())
        ours = {f"model.{key}": value for key, value in state.items() if f"model.{key}" in present}
        full = _full_keys(self.model_name)
        ignored = [key for key in state if f"model.{key}" not in present and key in full]
        unexpected = {key: value for key, value in state.items()
                      if f"model.{key}" not in present and key not in ignored}
        return load_state_into(self, {**ours, **unexpected}, source=str(path), ignored=ignored)

    def _read_weights(self, path: str | Path) -> dict[str, torch.Tensor]:
        if Path(path).suffix or Path(path).exists():
            return read_weight_file(path)
        models = _models()
        enum = models.get_model_weights(self.model_name)
        if str(path) not in enum.__members__:
            raise ValueError(f"TorchVision {self.model_name}: weights {path!r} is neither a file nor one of "
                             f"{list(enum.__members__)}")
        try:
            return enum[str(path)].get_state_dict(progress=False)
        except Exception as err:
            raise RuntimeError(f"TorchVision {self.model_name}: could not download {enum.__name__}.{path} "
                               f"({type(err).__name__}: {err}). Offline, download it once and pass the file: "
                               f"weights: path/to/{self.model_name}.pth") from err


def _full_keys(name: str) -> set[str]:
    """Keys of the full classification model (its head and deeper trunk are dropped on purpose)."""
    return set(_models().get_model(name, weights=None).state_dict())


def _consecutive_top_level_pairs(model: nn.Module, chain: Sequence[str], returned: set[str]
                                 ) -> list[tuple[str, str]]:
    """(conv, bn) names of consecutive top-level chain modules (ResNet's conv1 -> bn1)."""
    pairs = []
    for first, second in zip(chain, chain[1:]):
        if "." in first or "." in second or first in returned:
            continue
        conv, bn = getattr(model, first), getattr(model, second)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            pairs.append((first, second))
    return pairs


def probe_trunk(name: str, model: nn.Module) -> tuple[list[Feature], list[str]]:
    """(declared features with module `model.<path>`, trunk paths) from one probe forward of the chain."""
    paths = trunk_paths(model)
    x = torch.zeros(1, 3, *PROBE_SIZE)
    shapes = []
    try:
        with torch.no_grad():
            for path in paths:
                x = model.get_submodule(path)(x)
                shapes.append(tuple(x.shape))
            chained = x
            reference = _own_forward_at(model, paths[-1])
    except Exception as err:
        raise ValueError(f"TorchVision {name}: its modules {paths[:3]}... do not run as a chain ({err}); "
                         "only CNNs whose forward is a chain of modules before a global pool are supported "
                         "(use the Timm node for transformers)") from err
    if reference is None or reference.shape != chained.shape or not torch.allclose(reference, chained):
        raise ValueError(f"TorchVision {name}: running its trunk modules one after the other does not give "
                         "what its own forward computes; it cannot be used as a backbone node")
    return _features_from_shapes(name, paths, shapes), paths


def _own_forward_at(model: nn.Module, path: str) -> torch.Tensor | None:
    captured = []
    hook = model.get_submodule(path).register_forward_hook(lambda m, a, out: captured.append(out) and None)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *PROBE_SIZE))
    finally:
        hook.remove()
    return captured[-1] if captured else None


def _features_from_shapes(name: str, paths: list[str], shapes: list[tuple]) -> list[Feature]:
    by_stride: dict[int, Feature] = {}
    for path, shape in zip(paths, shapes):
        if len(shape) != 4:
            continue
        stride = PROBE_SIZE[0] / shape[2]
        if stride != int(stride) or stride > MAX_STRIDE:
            continue
        stride = int(stride)
        if 2 ** round(math.log2(stride)) != stride or math.ceil(PROBE_SIZE[1] / stride) != shape[3]:
            raise ValueError(f"TorchVision {name}: module {path} has stride {stride}, not a power of two")
        by_stride[stride] = Feature(stride, int(shape[1]), f"model.{path}")
    if MAX_STRIDE not in by_stride:
        raise ValueError(f"TorchVision {name}: no stride-{MAX_STRIDE} map among its trunk modules")
    return [by_stride[s] for s in sorted(by_stride)]


def prune_to(model: nn.Module, chain: Sequence[str]) -> nn.Module:
    """`model` without its classifier and without trunk modules after `chain` (deleted in place)."""
    keep = set(chain)
    tops = {path.split(".")[0] for path in chain}
    for name in list(dict(model.named_children())):
        if name not in tops:
            delattr(model, name)
    for top in tops:
        child = getattr(model, top)
        if isinstance(child, nn.Sequential) and top not in keep:
            for sub in list(child._modules):
                if f"{top}.{sub}" not in keep:
                    del child._modules[sub]
    return model
