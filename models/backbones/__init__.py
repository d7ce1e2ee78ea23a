"""Swappable backbones: the contract, the registry and the families.

    build_backbone("FastViT", "sa12")           # by family and variant (case-insensitive)
    build_backbone("EfficientViT_M0")           # by a seed alias that binds the variant
    available()                                 # every name a model YAML may use
"""

from __future__ import annotations

from .base import Backbone, LoadReport, load_state_into, normalise_variant_name, read_checkpoint
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
    families = []
    # Each family module exposes ALIASES = {seed name: variant}. Uncomment a family's two lines when it lands.
    from .riformer import ALIASES as RIFORMER_ALIASES, RIFormer
    families.append((RIFormer, RIFORMER_ALIASES))
    from .efficientvit import ALIASES as EFFICIENTVIT_ALIASES, EfficientViT
    families.append((EfficientViT, EFFICIENTVIT_ALIASES))
    from .fastvit import ALIASES as FASTVIT_ALIASES, FastViT
    families.append((FastViT, FASTVIT_ALIASES))
    from .mpvit import ALIASES as MPVIT_ALIASES, MPViT
    families.append((MPViT, MPVIT_ALIASES))
    from .levit import ALIASES as LEVIT_ALIASES, LeViT
    families.append((LeViT, LEVIT_ALIASES))
    return families


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
    "LoadReport",
    "Registry",
    "available",
    "build_backbone",
    "load_state_into",
    "normalise_variant_name",
    "read_checkpoint",
]
