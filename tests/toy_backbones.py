"""Small test-only backbones that exercise the slot mechanism of the model YAML."""

from __future__ import annotations

import torch
from torch import nn

from models.backbones import Backbone


class ToyPyramid(Backbone):
    """Strided convs emitting strides 4/8/16/32 (variant 'p4') or 8/16/32 (variant 'p3')."""

    family = "ToyPyramid"
    variants = {"p4": (4, 8, 16, 32), "p3": (8, 16, 32)}
    supported_strides = (4, 8, 16, 32)
    widths = {4: 8, 8: 16, 16: 24, 32: 32}

    def __init__(self, variant: str, out_strides=None, lie_about_channels: bool = False):
        super().__init__()
        variant = self.resolve_variant(variant)
        natural = self.variants[variant]
        wanted = self.check_out_strides(out_strides or natural)
        missing = [s for s in wanted if s not in natural]
        if missing:
            raise ValueError(f"ToyPyramid {variant} cannot produce strides {missing}; it produces {natural}")
        self.stem = nn.Conv2d(3, 8, 3, 4, 1)  # stride 4
        self.stages = nn.ModuleList(
            nn.Conv2d(self.widths[s // 2], self.widths[s], 3, 2, 1) for s in (8, 16, 32)
        )
        self.out_strides = wanted
        self.out_channels = tuple(self.widths[s] + (1 if lie_about_channels else 0) for s in wanted)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = {4: torch.relu(self.stem(x))}
        for stride, stage in zip((8, 16, 32), self.stages):
            maps[stride] = torch.relu(stage(maps[stride // 2]))
        return [maps[s] for s in self.out_strides]


def toy_yaml(variant: str = "p3", p3_slot: int = 2, extra_rows: list | None = None) -> dict:
    """A detection model dict with a ToyPyramid backbone node and a small PAN-free head."""
    head = [
        [-1, 1, "Conv", [32, 1, 1]],  # 6
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],  # 7
        [[-1, 3], 1, "Concat", [1]],  # 8: backbone P4
        [-1, 1, "C3", [32, False]],  # 9
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],  # 10
        [[-1, p3_slot], 1, "Concat", [1]],  # 11: backbone P3
        [-1, 1, "C3", [16, False]],  # 12
        [[12, 9, 5], 1, "Detect", ["nc", "anchors"]],  # 13
    ]
    return {
        "nc": 3,
        "depth_multiple": 1.0,
        "width_multiple": 1.0,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
        "backbone": [[-1, 1, "ToyPyramid", [variant]], [-1, 1, "SPPF", [32, 5]]],
        "head": head + (extra_rows or []),
    }
