"""Swappable backbones: the template, the registry and the families.

    build_backbone("FastViT", "sa12")           # by family and variant (case-insensitive)
    build_backbone("EfficientViT_M0")           # by a seed alias that binds the variant
    available()                                 # every name a model YAML may use

A new family is a `Backbone` subclass (see `base.py` for what it declares) in its own module, listed
once in `_families()` below with its aliases.
"""

from __future__ import annotations

from .base import Backbone, Feature, LoadReport, load_state_into, normalise_variant_name, read_checkpoint
from .registry import Registry


def _default_registry() -> Registry:
    """The families this project ships, each under its family name and its seed aliases."""
    registry = Registry()
    for family_cls, aliases in _families():
        registry.add(family_cls.family, family_cls)
        for alias, variant in aliases.items():
            registry.add(alias, family_cls, variant)
    return registry


def _families() -> list:
    """(class, {alias: variant}) for each shipped family; imported here so a broken family fails loudly."""
    from . import efficientvit, fastvit, levit, mpvit, riformer, timm_node, torchvision_node

    # Each family module holds its class and ALIASES = {YAML-usable alias: variant}.
    return [
        (riformer.RIFormer, riformer.ALIASES),
        (efficientvit.EfficientViT, efficientvit.ALIASES),
        (fastvit.FastViT, fastvit.ALIASES),
        (mpvit.MPViT, mpvit.ALIASES),
        (levit.LeViT, levit.ALIASES),
        (timm_node.Timm, {}),
        (torchvision_node.TorchVision, {}),
    ]


BACKBONES = _default_registry()


def build_backbone(name: str, variant: str | None = None, **options) -> Backbone:
    """Build a registered backbone by its YAML name; options go to the family (e.g. `weights=`)."""
    return BACKBONES.build(name, variant, **options)


def available() -> list[str]:
    """Every backbone name a model YAML may use."""
    return BACKBONES.names()


__all__ = [
    "BACKBONES",
    "Backbone",
    "Feature",
    "LoadReport",
    "Registry",
    "available",
    "build_backbone",
    "load_state_into",
    "normalise_variant_name",
    "read_checkpoint",
]
