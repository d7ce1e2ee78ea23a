"""Name -> backbone class table used by the YAML parser and `build_backbone`.

The table is explicit: `models/backbones/__init__.py` lists every family once. Adding a name twice is
an error, asking for an unknown name lists the known ones with the closest matches first. Aliases
bind a fixed variant, so the seed's module names (`EfficientViT_M0`) work in a YAML row too.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .base import Backbone

LOGGER = logging.getLogger("vitdet." + __name__)


@dataclass(frozen=True)
class Entry:
    cls: type[Backbone]
    variant: str | None = None  # bound variant for aliases such as EfficientViT_M0
    source: str | None = None   # the plugin file that registered it (None: shipped with the project)


class Registry:
    """A table of backbone names; names are matched exactly as written in the YAML."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, cls: type[Backbone], variant: str | None = None,
            source: str | None = None) -> None:
        if name in self._entries:
            raise KeyError(f"backbone name {name!r} is registered twice ({self._entries[name].cls.__name__}, "
                           f"{cls.__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise TypeError(f"backbone {name!r}: {cls!r} is not a Backbone subclass")
        if variant is not None:
            variant = cls.resolve_variant(variant)
        self._entries[name] = Entry(cls, variant, source)

    def remove(self, name: str) -> None:
        del self._entries[name]

    @contextmanager
    def temporarily(self, name: str, cls: type[Backbone], variant: str | None = None) -> Iterator[None]:
        """Register `name` for the duration of a `with` block (tests, experiments)."""
        self.add(name, cls, variant)
        try:
            yield
        finally:
            self.remove(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown backbone {name!r}.{hint} Known backbones: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, name: str, variant: str | None = None, **options) -> Backbone:
        """Build `name` (variant from the alias or the argument); `weights=path` loads official weights.

        `allow_missing=True` accepts a checkpoint that leaves some of our keys empty (they stay random,
        and the report says which).
        """
        entry = self.get(name)
        if entry.variant is not None and variant is not None and \
                entry.cls.resolve_variant(variant) != entry.variant:
            raise ValueError(f"{name} is bound to variant {entry.variant!r}; got variant {variant!r}")
        weights = options.pop("weights", None)
        allow_missing = options.pop("allow_missing", False)
        model = entry.cls(entry.variant or variant, **options)
        if weights:
            report = model.load_pretrained(weights)
            LOGGER.info(f"{name}: {report.summary()}")
            report.raise_if_incomplete(allow_missing=allow_missing)
        return model
