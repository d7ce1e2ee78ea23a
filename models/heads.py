"""The anchor-free decoupled detection head `DetectAF` (YOLOv8 style), a YAML module:

    [[17, 20, 23], 1, DetectAF, [nc]]            # instead of [[17, 20, 23], 1, Detect, [nc, anchors]]
    [[17, 20, 23], 1, DetectAF, [nc, 16, lite]]  # the same with lighter branches (dw, lite)

Per level, a box branch (two 3x3 Conv-BN-SiLU, then a 1x1 conv to 4 * reg_max logits: a distribution
over the integer distances 0 .. reg_max - 1 cells from the cell centre to each box side) and a class
branch (two 3x3 Conv-BN-SiLU, then a 1x1 conv to nc logits). No objectness, no anchors: targets are
assigned by task alignment (utils/tal.py) and trained with utils/loss_af.py.

The third argument picks the branch layers: `conv` (the default, YOLOv8's full 3x3 convolutions), `dw`
(each 3x3 Conv becomes a depthwise 3x3 Conv followed by a pointwise 1x1 Conv) or `lite` (one such pair
per branch). On a small neck the full branches cost nearly as much as the rest of the model (yolov5n at
320: 1.03 -> 1.77 GFLOPs, about 30% fewer training images/s) and they are what learns the more precise
boxes; `dw` and `lite` add 6-11% FLOPs (13-20% training time on yolov5n) but learned no more than Detect
on BCCD (docs/heads.md).

Eval output has exactly the layout of the anchor-based `Detect`: (B, N, 5 + nc) rows
[x, y, w, h (input pixels), obj, cls scores...], N = sum over levels of ny * nx (level-major, then
row-major). The objectness column is the constant 1.0, so NMS's score obj x cls is the class score and
every consumer of Detect's rows (NMS, val, COCO JSON, detect, TTA, exports) runs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.common import Conv, DWConv
from utils.anchor_points import distances_to_xywh, distribution_expectation, make_anchor_points

REG_MAX = 16  # distance bins per box side (YOLOv8's default): distances up to 15 cells of each level


class DetectAF(nn.Module):
    """Anchor-free decoupled head. ch: input channels per level (shallow to deep).

    Train mode returns the raw maps [(B, 4 * reg_max + nc, ny, nx)] per level (box logits first).
    Eval mode returns (decoded (B, N, 5 + nc), raw maps), or only `decoded` when `export` is set
    (the same contract as Detect). `stride` (nl,) is read from the maps by DetectionModel at build time.
    """

    export = False  # set by the exporter: return only the decoded tensor
    anchor_free = True  # what build_criterion and the trainer's autoanchor check look at
    na = 1  # one prediction per cell (what the TTA row bookkeeping counts per cell)

    def __init__(self, nc: int = 80, ch: Sequence[int] = (), reg_max: int = REG_MAX, branches: str = "conv"):
        super().__init__()
        if not ch:
            raise ValueError("DetectAF needs the input channels of at least one level")
        if branches not in BRANCHES:
            raise ValueError(f"DetectAF's branches must be one of {', '.join(BRANCHES)}, got {branches!r}")
        self.nc, self.nl, self.reg_max = int(nc), len(ch), int(reg_max)
        self.no = self.nc + 5  # width of a decoded row, as Detect's
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        box_width = max(16, ch[0] // 4, 4 * self.reg_max)  # YOLOv8's branch widths
        cls_width = max(ch[0], min(self.nc, 100))
        branch = BRANCHES[branches]
        self.box_branch = nn.ModuleList(branch(c, box_width, 4 * self.reg_max) for c in ch)
        self.cls_branch = nn.ModuleList(branch(c, cls_width, self.nc) for c in ch)

    def forward(self, x: list[torch.Tensor]):
        maps = [torch.cat((box(f), cls(f)), 1) for f, box, cls in zip(x, self.box_branch, self.cls_branch)]
        if self.training:
            return maps
        decoded = self.decode(maps)
        return decoded if self.export else (decoded, maps)

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> (B, N, 5 + nc) rows [x, y, w, h (pixels), 1.0, sigmoid class scores]."""
        points, strides = make_anchor_points(maps, self.stride)
        rows = torch.cat([m.flatten(2) for m in maps], 2).transpose(1, 2)  # (B, N, 4 * reg_max + nc)
        box_logits, cls_logits = rows.split((4 * self.reg_max, self.nc), -1)
        xywh = distances_to_xywh(distribution_expectation(box_logits, self.reg_max), points) * strides
        scores = cls_logits.sigmoid()
        return torch.cat((xywh, torch.ones_like(scores[..., :1]), scores), -1)

    @torch.no_grad()
    def initialize_biases(self) -> None:
        """YOLOv8's prior: box logits 1.0 (uniform distance distribution); class logits such that about
        5 objects per 640x640 image and level are expected over all nc classes."""
        for box, cls, stride in zip(self.box_branch, self.cls_branch, self.stride.tolist()):
            box[-1].bias.fill_(1.0)
            cls[-1].bias.fill_(math.log(5 / self.nc / (640 / stride) ** 2))


def _branch(in_channels: int, width: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(Conv(in_channels, width, 3), Conv(width, width, 3),
                         nn.Conv2d(width, out_channels, 1))


def _dw_branch(in_channels: int, width: int, out_channels: int) -> nn.Sequential:
    """_branch with each 3x3 Conv split into a depthwise 3x3 Conv and a pointwise 1x1 Conv."""
    return nn.Sequential(DWConv(in_channels, in_channels, 3), Conv(in_channels, width, 1),
                         DWConv(width, width, 3), Conv(width, width, 1),
                         nn.Conv2d(width, out_channels, 1))


def _lite_branch(in_channels: int, width: int, out_channels: int) -> nn.Sequential:
    """One depthwise 3x3 Conv and one pointwise 1x1 Conv before the output conv: the lightest branch that
    still sees a 3x3 neighbourhood with its own features."""
    return nn.Sequential(DWConv(in_channels, in_channels, 3), Conv(in_channels, width, 1),
                         nn.Conv2d(width, out_channels, 1))


# DetectAF's branch layers by name: two full 3x3 convolutions (YOLOv8), two depthwise-separable ones, or one
BRANCHES = {"conv": _branch, "dw": _dw_branch, "lite": _lite_branch}


def is_anchor_free(head: nn.Module) -> bool:
    """True for a head without anchors (no AutoAnchor, the anchor-free loss)."""
    return bool(getattr(head, "anchor_free", False))
