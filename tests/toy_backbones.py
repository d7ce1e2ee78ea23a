"""A test-only backbone family written on the `Backbone` template, and a model YAML that uses it.

`ToyPyramid` is what a new family looks like: it declares its features once (`declare_features`),
builds only the trunk the requested strides need (`num_built`), and leaves input normalisation,
channel bookkeeping, unbuilt-key filtering and `reparameterize()` to the base class. It is registered
only inside tests (`BACKBONES.temporarily`), where it exercises the YAML slot mechanism
(tests/test_model.py) and receives every contract test (tests/test_backbone_contract.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.backbones import Backbone, Feature
from models.backbones.layers import ConvBN, DropPath, drop_path_rates


class ToyStage(nn.Module):
    """Stride-2 ConvBN, then one residual 3x3 ConvBN whose branch is dropped with `drop_path`."""

    def __init__(self, in_channels: int, channels: int, drop_path: float) -> None:
        super().__init__()
        self.downsample = ConvBN(in_channels, channels, 3, stride=2, activation=nn.ReLU())
        self.residual = ConvBN(channels, channels, 3, activation=nn.ReLU())
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        return x + self.drop_path(self.residual(x))


class ToyPyramid(Backbone):
    """A ConvBN stem (stride 4) and three ToyStages (strides 8, 16, 32).

    Variant 'p4' returns strides 4/8/16/32 (the stem's map too), 'p3' only 8/16/32: the variant's
    config is the tuple of strides it declares. `lie_about_channels` declares one channel too many,
    for the model builder's consistency check.
    """

    family = "ToyPyramid"
    variants = {"p4": (4, 8, 16, 32), "p3": (8, 16, 32)}
    widths = {4: 8, 8: 16, 16: 24, 32: 32}
    depths = (1, 1, 1)  # one residual block per stage, for the drop-path schedule

    @classmethod
    def declare_features(cls, strides: Sequence[int], lie_about_channels: bool = False) -> list[Feature]:
        modules = {4: "stem", 8: "stages.0", 16: "stages.1", 32: "stages.2"}
        return [Feature(s, cls.widths[s] + int(lie_about_channels), modules[s]) for s in strides]

    def __init__(self, variant: str, out_strides=None, lie_about_channels: bool = False,
                 normalize_input: bool = False, drop_path_rate: float = 0.0) -> None:
        super().__init__(variant, out_strides, normalize_input=normalize_input,
                         lie_about_channels=lie_about_channels)
        rates = drop_path_rates(drop_path_rate, self.depths)
        self.stem = ConvBN(3, self.widths[4], 3, stride=4, activation=nn.ReLU())
        self.stages = nn.ModuleList(
            ToyStage(self.widths[s // 2], self.widths[s], rates[i][0])
            for i, s in enumerate((8, 16, 32)[: self.num_built("stages")])
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = {4: self.stem(x)}
        for stride, stage in zip((8, 16, 32), self.stages):
            maps[stride] = stage(maps[stride // 2])
        return [maps[s] for s in self.out_strides]


TOY_FAMILIES = (ToyPyramid,)


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
