"""YOLOv5 building blocks (v6+ architecture).

Attribute names (`conv`, `bn`, `cv1`, `m`, ...) are YOLOv5's so that YOLOv5 state_dicts load with
strict=True; constructor arguments carry descriptive names. All blocks map (B, C_in, H, W) ->
(B, C_out, H', W').
"""

from __future__ import annotations

import torch
from torch import nn

from models.backbones.layers import fuse_conv_bn


def autopad(kernel: int | list[int], padding: int | None = None, dilation: int = 1) -> int | list[int]:
    """'Same' padding for odd kernels: the output has ceil(H / stride) rows."""
    if dilation > 1:
        kernel = dilation * (kernel - 1) + 1 if isinstance(kernel, int) else [dilation * (k - 1) + 1 for k in kernel]
    if padding is None:
        padding = kernel // 2 if isinstance(kernel, int) else [k // 2 for k in kernel]
    return padding


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU. `reparameterize()` (run by `DetectionModel.fuse()`) folds
    the BN into the conv and replaces it by Identity; a second call does nothing."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        act: bool | nn.Module = True,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride, autopad(kernel, padding, dilation),
            groups=groups, dilation=dilation, bias=False,
        )
        # YOLOv5 trains its neck BNs with eps 1e-3 and momentum 0.03.
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn(self.conv, self.bn)
            self.bn = nn.Identity()


class DWConv(Conv):
    """Depth-wise convolution: groups = gcd(in, out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 dilation: int = 1, act: bool | nn.Module = True):
        groups = torch.gcd(torch.tensor(in_channels), torch.tensor(out_channels)).item()
        super().__init__(in_channels, out_channels, kernel, stride, groups=int(groups), dilation=dilation, act=act)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 with an optional residual when shapes agree."""

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True, groups: int = 1,
                 expansion: float = 0.5):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = Conv(hidden, out_channels, 3, 1, groups=groups)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class BottleneckCSP(nn.Module):
    """CSP bottleneck of YOLOv4/early YOLOv5 (https://github.com/WongKinYiu/CrossStagePartialNetworks)."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, shortcut: bool = True,
                 groups: int = 1, expansion: float = 0.5):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = nn.Conv2d(in_channels, hidden, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(hidden, hidden, 1, 1, bias=False)
        self.cv4 = Conv(2 * hidden, out_channels, 1, 1)
        self.bn = nn.BatchNorm2d(2 * hidden, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, groups, expansion=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class C3(nn.Module):
    """CSP bottleneck with three convolutions (YOLOv5 v6)."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, shortcut: bool = True,
                 groups: int = 1, expansion: float = 0.5):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = Conv(in_channels, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, out_channels, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, groups, expansion=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools (YOLOv3-SPP)."""

    def __init__(self, in_channels: int, out_channels: int, kernels: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(kernels) + 1), out_channels, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPF(nn.Module):
    """Fast SPP: three chained 5x5 max-pools, equivalent to SPP(k=(5, 9, 13))."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 5):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, out_channels, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=kernel, stride=1, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Focus(nn.Module):
    """Space-to-depth (B, C, H, W) -> (B, 4C, H/2, W/2), then a Conv (YOLOv5 before v6)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int | None = None, groups: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = Conv(in_channels * 4, out_channels, kernel, stride, padding, groups, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along `dimension` (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)
