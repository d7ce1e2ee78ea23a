"""Your own backbone without editing the project: a registration decorator and plugin files.

In a file of your own, say my_backbones.py:

    from torch import nn
    from models.backbones import Backbone, Feature
    from models.backbones.plugins import register_backbone

    @register_backbone
    class TinyNet(Backbone):
        family = "TinyNet"                       # the name a model YAML uses: [-1, 1, TinyNet, [s]]
        variants = {"s": (16, 32, 64)}           # variant -> any config object

        @classmethod
        def declare_features(cls, widths):
            return [Feature(8, widths[0], "stages.0"), Feature(16, widths[1], "stages.1"),
                    Feature(32, widths[2], "stages.2")]

        def __init__(self, variant, out_strides=None, normalize_input=True):
            super().__init__(variant, out_strides, normalize_input=normalize_input)
            ...

        def forward_features(self, x):
            ...                                  # the maps of self.out_features, shallow to deep

then pass the file to any script (`python train.py --cfg my.yaml --plugin my_backbones.py`, also
val.py, detect.py, export.py, benchmarks.py) or to `Detector(weights, plugins=["my_backbones.py"])`.
A model YAML never imports code by itself: only the files named this way are run. A checkpoint
records the plugin file's name, and loading it without the plugin says which file to pass.
`register_backbone(name="Other")` registers under another name; registering a name twice is an error.

Any nn.Module whose forward returns a list of maps also works, with its strides and channels declared
in the decorator: `@register_module("MyMod", strides=(8, 16, 32), channels=(64, 128, 256))` on a class
constructed without arguments; the YAML row is `[-1, 1, MyMod, []]`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from torch import nn

from . import BACKBONES
from .base import Backbone, Feature

B = TypeVar("B", bound=type[Backbone])


def register_backbone(cls: B | None = None, *, name: str | None = None) -> B | Callable[[B], B]:
    """Class decorator: register a Backbone subclass under `name` (default: its `family`)."""

    def register(backbone_cls: B) -> B:
        key = name or backbone_cls.family
        if not key:
            raise TypeError(f"{backbone_cls.__name__}: set the class attribute `family` (the YAML name) or "
                            "pass register_backbone(name=...)")
        module = sys.modules.get(backbone_cls.__module__)
        source = getattr(module, "__file__", None)
        BACKBONES.add(key, backbone_cls, source=str(source) if source else None)
        return backbone_cls

    return register(cls) if cls is not None else register


def register_module(name: str, strides: Sequence[int], channels: Sequence[int], *,
                    normalize_input: bool = False) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator for a plain nn.Module (constructed without arguments) whose forward maps a
    (B, 3, H, W) batch to a list of maps of `strides` (powers of two, rising) with `channels`.

    It registers `name` as a one-variant backbone ("default", bound, so the YAML row is
    `[-1, 1, <name>, []]`) wrapping the module under `module.`; the maps the YAML does not read are
    dropped after the forward, so a module should return only what the YAML reads (else its unused
    layers get no gradient, which stalls DDP). `normalize_input` applies ImageNet mean/std first.
    The module class itself is returned unchanged.
    """
    declared = [Feature(int(s), int(c), "module") for s, c in zip(strides, channels)]
    if len(declared) != len(strides) or len(strides) != len(channels):
        raise ValueError(f"register_module({name!r}): give one channel count per stride, got {strides} and "
                         f"{channels}")

    def register(module_cls: type[nn.Module]) -> type[nn.Module]:
        def __init__(self, variant=None, out_strides=None, normalize_input=normalize_input):
            Backbone.__init__(self, variant, out_strides, normalize_input=normalize_input)
            self.module = module_cls()

        def forward_features(self, x):
            maps = list(self.module(x))
            return [m for m, f in zip(maps, self.feature_info) if f.stride in self.out_strides]

        adapter = type(name, (Backbone,), {
            "family": name, "variants": {"default": None}, "__init__": __init__,
            "forward_features": forward_features, "__module__": module_cls.__module__,
            "declare_features": classmethod(lambda cls, config: declared),
            "__doc__": f"{module_cls.__name__} as a backbone node (plugins.register_module)."})
        module = sys.modules.get(module_cls.__module__)
        source = getattr(module, "__file__", None)
        BACKBONES.add(name, adapter, variant="default", source=str(source) if source else None)
        return module_cls

    return register


def _module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"vitdet_plugin_{path.stem}_{digest}"


def load_plugin(path: str | Path) -> str:
    """Import one plugin file by path (once per process); returns its module name."""
    path = Path(path).expanduser().resolve()
    if not path.is_file() or path.suffix != ".py":
        raise FileNotFoundError(f"--plugin {path}: not a Python file")
    name = _module_name(path)
    if name in sys.modules:
        return name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"--plugin {path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return name


def load_plugins(paths: Iterable[str | Path] | None) -> list[str]:
    """Import every plugin file of `paths` (None or empty: nothing); returns their module names."""
    return [load_plugin(path) for path in (paths or [])]
