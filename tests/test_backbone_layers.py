"""The layers shared by all backbone families (models/backbones/layers.py): the one Conv+BN fold,
ConvBN, DropPath and its rate schedule, and the fuse walker."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.backbones.layers import (
    ConvBN,
    DropPath,
    drop_path_rates,
    fold_batch_norm,
    fuse_conv_bn,
    reparameterize_modules,
)
from models.common import Conv
from tests.backbone_helpers import perturb_, relative_diff


def eval_pair(*modules: nn.Module) -> nn.Sequential:
    return perturb_(nn.Sequential(*modules), scale=0.1).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_fold_batch_norm_is_the_float64_formula_in_the_weight_dtype(bias):
    pair = eval_pair(nn.Conv2d(4, 6, 3, bias=bias), nn.BatchNorm2d(6))
    conv, bn = pair
    weight, folded_bias = fold_batch_norm(conv.weight, conv.bias, bn)
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    shift = conv.bias.double() if bias else 0
    torch.testing.assert_close(weight, (conv.weight.double() * scale[:, None, None, None]).float())
    expected_bias = (shift - bn.running_mean.double()) * scale + bn.bias.double()
    torch.testing.assert_close(folded_bias, expected_bias.float())
    assert weight.dtype == folded_bias.dtype == torch.float32
    half = fold_batch_norm(conv.weight.bfloat16(), None, bn.bfloat16())
    assert half[0].dtype == half[1].dtype == torch.bfloat16


@pytest.mark.parametrize("geometry", [dict(stride=2), dict(groups=4, padding=1), dict(dilation=2, padding=2)])
def test_fuse_conv_bn_equals_conv_then_bn_in_eval(geometry):
    pair = eval_pair(nn.Conv2d(8, 8, 3, bias=False, **geometry), nn.BatchNorm2d(8))
    fused = fuse_conv_bn(*pair)
    x = torch.rand(2, 8, 17, 13)
    with torch.no_grad():
        assert relative_diff(fused(x), pair(x)) < 1e-6
    assert fused.bias is not None and fused.weight.requires_grad
    frozen = fuse_conv_bn(pair[0].requires_grad_(False), pair[1])
    assert not frozen.weight.requires_grad  # a fold keeps the conv's trainability


@pytest.mark.parametrize("block", [
    lambda: ConvBN(6, 10, 3, stride=2, activation=nn.Hardswish()),
    lambda: ConvBN(8, 8, 5, groups=8, bn_weight_init=0.0),
    lambda: Conv(6, 10, 3, 2),  # YOLOv5's Conv folds with the same function
])
def test_conv_bn_blocks_reparameterize_exactly_and_once(block):
    module = perturb_(block(), scale=0.1).eval()
    x = torch.rand(1, module.conv.in_channels, 15, 12)
    with torch.no_grad():
        before = module(x)
        module.reparameterize()
        after = module(x)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        module.reparameterize()
    assert isinstance(module.bn, nn.Identity) and set(state) == {"conv.weight", "conv.bias"}
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    assert relative_diff(after, before) < 1e-6


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 4, 4)
    assert torch.equal(drop.eval()(x), x) and torch.equal(DropPath(0.0).train()(x), x)
    torch.manual_seed(0)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # survivors scaled by 1 / (1 - rate)
    assert all(len(row.unique()) == 1 for row in per_sample)  # a sample is dropped as a whole
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        DropPath(1.0)


def test_drop_path_rates_rise_linearly_over_all_blocks():
    rates = drop_path_rates(0.3, (2, 3, 1))
    assert [len(stage) for stage in rates] == [2, 3, 1]
    flat = [rate for stage in rates for rate in stage]
    assert flat[0] == 0.0 and flat[-1] == pytest.approx(0.3)
    assert flat == pytest.approx([0.3 * i / 5 for i in range(6)])
    assert drop_path_rates(0.0, (2, 2)) == [[0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="drop_path_rate"):
        drop_path_rates(-0.1, (1,))


class Folding(nn.Module):
    """A foldable module that records its calls and holds a foldable child it folds itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ConvBN(3, 3)
        self.calls = 0

    def reparameterize(self) -> None:
        self.calls += 1


def test_fuse_walker_folds_outermost_foldable_modules_only():
    root = nn.Sequential(nn.Sequential(ConvBN(3, 3), nn.ReLU()), Folding(), nn.ModuleList([ConvBN(3, 3)]))
    reparameterize_modules(root)
    assert isinstance(root[0][0].bn, nn.Identity) and isinstance(root[2][0].bn, nn.Identity)
    assert root[1].calls == 1 and isinstance(root[1].inner.bn, nn.BatchNorm2d)  # its own business
    reparameterize_modules(root)
    assert root[1].calls == 2  # the walker relies on each fold being idempotent
