"""Geometry of anchor-free heads: cell-centre anchor points, distance (ltrb) <-> box conversions and the
expectation of a distribution over integer distance bins (DFL decoding).

Units: a point or a distance is in grid cells of its level (multiply by the level's stride for input
pixels). Boxes are corners [x1, y1, x2, y2]; ltrb distances are [left, top, right, bottom] from the
point to the box sides, all >= 0 for a point inside the box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_anchor_points(maps: Sequence[torch.Tensor], strides: torch.Tensor,
                       offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of every level, level-major then row-major (the order of `flatten(2)` on each map).

    maps: per level a tensor (B, C, ny, nx); strides: (nl,) pixels per cell.
    Returns (points (N, 2) [x, y] in cells of their level, strides (N, 1)), both in the maps' dtype and
    on their device, N = sum(ny * nx). Built from the map shapes on every call (no cache to go stale,
    exportable with dynamic input sizes).
    """
    points, stride_rows = [], []
    for level, feature in enumerate(maps):
        ny, nx = feature.shape[2], feature.shape[3]
        dtype, device = feature.dtype, feature.device
        y = torch.arange(ny, dtype=dtype, device=device) + offset
        x = torch.arange(nx, dtype=dtype, device=device) + offset
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        points.append(torch.stack((xv, yv), -1).view(-1, 2))
        stride_rows.append(torch.ones_like(xv).view(-1, 1) * strides[level].to(device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_rows)


def distribution_expectation(logits: torch.Tensor, reg_max: int) -> torch.Tensor:
    """DFL decoding: (..., 4 * reg_max) logits -> (..., 4) distances in cells.

    Each side's reg_max logits are a softmax distribution over the integer distances 0 .. reg_max - 1;
    the distance is its expectation.
    """
    probs = logits.unflatten(-1, (4, reg_max)).softmax(-1)
    bins = torch.arange(reg_max, dtype=probs.dtype, device=probs.device)
    return (probs * bins).sum(-1)


def distances_to_boxes(distances: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(..., N, 4) ltrb distances and (N, 2) points -> (..., N, 4) boxes [x1, y1, x2, y2]."""
    left_top, right_bottom = distances.chunk(2, -1)
    return torch.cat((points - left_top, points + right_bottom), -1)


def distances_to_xywh(distances: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(..., N, 4) ltrb distances and (N, 2) points -> (..., N, 4) boxes [x, y, w, h] (centre, size)."""
    left_top, right_bottom = distances.chunk(2, -1)
    return torch.cat((points + (right_bottom - left_top) / 2, left_top + right_bottom), -1)


def boxes_to_distances(points: torch.Tensor, boxes: torch.Tensor, max_distance: float) -> torch.Tensor:
    """(N, 2) points and (..., N, 4) boxes [x1, y1, x2, y2] -> (..., N, 4) ltrb distances clamped to
    [0, max_distance] (the DFL targets: they must fall between two existing bins)."""
    left_top = points - boxes[..., :2]
    right_bottom = boxes[..., 2:] - points
    return torch.cat((left_top, right_bottom), -1).clamp(0, max_distance)
