"""Helpers for the official-weights tests: the fixtures' deterministic weight-fill rule.

The rule (from the fixtures' README) fills every floating-point tensor of the official backbone
state_dict from a generator seeded by the CRC32 of its official name, so a test can rebuild the exact
weights the official code ran with, knowing only the names and shapes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "backbone_refs"


def fill_value(name: str, shape, scale: float) -> torch.Tensor:
    """The fixture value of the official tensor `name` with `shape` (float32)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(tuple(shape), generator=g)
    if name.endswith("running_var"):
        return 1 + 0.1 * t.abs()
    if name.endswith("running_mean"):
        return 0.1 * t
    if t.dim() == 1 and name.endswith("weight"):
        return 1 + 0.1 * t
    return scale * t


def load_keys(stem: str) -> dict:
    """The parsed `<stem>.keys.json` (e.g. stem='riformer_s12')."""
    return json.loads((FIXTURES / f"{stem}.keys.json").read_text())


def load_features(stem: str) -> dict[str, np.ndarray]:
    """Every array of `<stem>.npz` (input, feat_<stride>, fused_feat_<stride>, ...)."""
    with np.load(FIXTURES / f"{stem}.npz") as npz:
        return {k: npz[k] for k in npz.files}


def official_state(keys: dict[str, list], scale: float, non_float: set[str] = frozenset(),
                   shapes: dict[str, list] | None = None) -> dict[str, torch.Tensor]:
    """An official-layout state_dict filled by the rule.

    keys: {official name: shape}; non-float names get zeros of int64 (callers that need the real
    integer buffers rebuild them); `shapes` overrides shapes (fixture shape mismatches).
    """
    shapes = shapes or {}
    state = {}
    for name in sorted(keys):
        shape = shapes.get(name, keys[name])
        if name in non_float:
            state[name] = torch.zeros(tuple(shape), dtype=torch.int64)
        else:
            state[name] = fill_value(name, shape, scale)
    return state


def assert_features_close(ours: torch.Tensor, ref: np.ndarray, rel: float = 1e-5, what: str = "") -> None:
    """max|ours - ref| <= rel * max|ref| (the fixtures' recommended tolerance)."""
    ours_np = ours.detach().float().cpu().numpy()
    assert ours_np.shape == ref.shape, f"{what}: shape {ours_np.shape} != reference {ref.shape}"
    np.testing.assert_allclose(ours_np, ref, rtol=0, atol=rel * float(np.abs(ref).max()), err_msg=what)
