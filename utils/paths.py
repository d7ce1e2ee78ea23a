"""Safe path components: turning a name read from a file (a class name in a checkpoint, export
metadata or dataset YAML, a stream's URL) into exactly one harmless file or folder name.

    save_dir / "crops" / safe_path_component(name) / f"{stem}.jpg"

A name that is already harmless comes back unchanged ('person', 'traffic light', 'café'). Any other
name has each unsafe character replaced by '_' and gets '~' and 8 hex digits of the SHA-1 of the
original name appended, so distinct names stay distinct ('../x' -> '.._x~1a2b3c4d', while '__x'
stays '__x') and the same name always gives the same component.

Unsafe: path separators ('/', '\\'), ':' (a drive or stream on Windows), NUL and other control
characters, lone surrogates, the names '', '.' and '..', and names longer than MAX_COMPONENT_BYTES
in UTF-8 (they are cut, then suffixed). Names that differ only in case or trailing dots are left
as they are: they stay distinct on Linux, though a case-insensitive file system merges their folders.
"""

from __future__ import annotations

import hashlib
import re

MAX_COMPONENT_BYTES = 200  # below NAME_MAX (255) with room for a stem, suffix and counter after it
HASH_SEPARATOR = "~"
_UNSAFE_CHARS = re.compile(r'[/\\:\x00-\x1f\x7f\ud800-\udfff]')  # lone surrogates cannot be encoded
_RESERVED = ("", ".", "..")


def is_safe_path_component(name: str) -> bool:
    """True when `name` is one ordinary file name: joined to a folder it names a child of it."""
    return (name not in _RESERVED and not _UNSAFE_CHARS.search(name)
            and len(name.encode("utf-8")) <= MAX_COMPONENT_BYTES)


def _digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _cut_to_bytes(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in `limit` bytes (no broken character)."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def safe_path_component(name: object) -> str:
    """`name` (str() of it) as a single, deterministic, collision-resistant path component."""
    name = str(name)
    if is_safe_path_component(name):
        return name
    suffix = HASH_SEPARATOR + _digest(name)
    cleaned = _UNSAFE_CHARS.sub("_", name)
    if cleaned in _RESERVED:  # '', '.', '..' -> '_', '_.', '_..': never the folder itself or its parent
        cleaned = "_" + cleaned
    return _cut_to_bytes(cleaned, MAX_COMPONENT_BYTES - len(suffix)) + suffix
