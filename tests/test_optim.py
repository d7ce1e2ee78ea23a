"""Optimiser parameter groups, lr schedule, warmup, EMA, clipping (YOLOv5 semantics)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from utils.optim import (
    ModelEMA,
    clip_gradients,
    de_parallel,
    lr_lambda,
    scale_weight_decay,
    smart_optimizer,
    split_parameter_groups,
    warmup_iterations,
    warmup_step,
)

HYP = {"warmup_bias_lr": 0.1, "warmup_momentum": 0.8, "momentum": 0.937, "warmup_epochs": 3.0}


class LayerNorm2d(nn.Module):
    """A channels-first norm as backbones write it: not a torch norm class, but named like one."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x


class Block(nn.Module):
    """Transformer-ish block holding every kind of parameter that must not decay."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.attention_biases = nn.Parameter(torch.zeros(2, 9))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1))
        self.rel_pos_h = nn.Parameter(torch.zeros(5, dim))
        self.gamma_1 = nn.Parameter(torch.ones(dim))  # only excluded because no_weight_decay() names it
        self.mixer = nn.Conv2d(dim, dim, 3, bias=False)  # excluded as a whole module by no_weight_decay()


class TinyBackbone(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, bias=False)
        self.stem_bn = nn.BatchNorm2d(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, 4, 4))
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.out_norm = LayerNorm2d(dim)
        self.gn = nn.GroupNorm(2, dim)

    def no_weight_decay(self) -> set[str]:
        return {"blocks.0.gamma_1", "blocks.1.gamma_1", "blocks.0.mixer"}


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyBackbone()
        self.head = nn.Conv2d(8, 7, 1)  # weight decays, bias does not
        self.shared = self.head  # a tied module: its parameters must be counted once
        self.yaml, self.nc, self.names, self.stride = {"nc": 2}, 2, ["a", "b"], torch.tensor([8.0])


def names_of(model: nn.Module, params: list) -> set:
    lookup = {id(p): n for n, p in model.named_parameters()}
    return {lookup[id(p)] for p in params}


def test_parameter_groups_cover_everything_once():
    model = TinyDetector()
    groups = split_parameter_groups(model)
    bias, decay, no_decay = (names_of(model, groups[k]) for k in ("bias", "decay", "no_decay"))
    assert decay == {"backbone.stem.weight", "backbone.blocks.0.qkv.weight", "backbone.blocks.1.qkv.weight",
                     "backbone.blocks.1.mixer.weight", "head.weight"}
    assert bias == {"backbone.stem_bn.bias", "backbone.out_norm.bias", "backbone.gn.bias", "head.bias"} | {
        f"backbone.blocks.{i}.{m}.bias" for i in (0, 1) for m in ("norm", "qkv")
    }
    per_block = {"norm.weight", "attention_biases", "layer_scale", "rel_pos_h", "gamma_1"}
    assert no_decay == {"backbone.stem_bn.weight", "backbone.pos_embed", "backbone.out_norm.weight",
                        "backbone.gn.weight", "backbone.blocks.0.mixer.weight"} | {
        f"backbone.blocks.{i}.{n}" for i in (0, 1) for n in per_block
    }
    total = sum(len(v) for v in groups.values())
    assert total == len(list(model.parameters()))  # tied head counted once, nothing left out
    assert not (bias & decay or bias & no_decay or decay & no_decay)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_smart_optimizer_groups_and_settings(name, caplog):
    model = TinyDetector()
    with caplog.at_level(logging.INFO, logger="vitdet"):
        optimizer = smart_optimizer(model, name, lr=0.01, momentum=0.937, decay=5e-4)
    assert f"optimizer: {name}(lr=0.01)" in caplog.text
    assert "15 weight(decay=0.0), 5 weight(decay=0.0005), 8 bias" in caplog.text
    bias_group, decay_group, no_decay_group = optimizer.param_groups
    assert names_of(model, decay_group["params"]) == names_of(model, split_parameter_groups(model)["decay"])
    sizes = [len(g["params"]) for g in (bias_group, decay_group, no_decay_group)]
    assert sizes == [8, 5, 15]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 5e-4, 0.0]
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    if name == "SGD":
        assert isinstance(optimizer, torch.optim.SGD)
        assert bias_group["nesterov"] is True and bias_group["momentum"] == 0.937
    else:
        assert type(optimizer).__name__ == name
        assert bias_group["betas"] == (0.937, 0.999)


def test_smart_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown optimizer 'RMSProp'.*SGD, Adam, AdamW"):
        smart_optimizer(TinyDetector(), "RMSProp")


def test_lr_lambda_linear_and_cosine():
    linear, cosine = lr_lambda(100, 0.01), lr_lambda(100, 0.01, cos=True)
    assert [linear(0), linear(50), linear(100)] == pytest.approx([1.0, 0.505, 0.01])
    assert [cosine(0), cosine(50), cosine(100)] == pytest.approx([1.0, 0.505, 0.01])
    assert cosine(25) == pytest.approx(((1 - math.cos(math.pi / 4)) / 2) * (0.01 - 1) + 1)
    assert cosine(25) > linear(25)  # cosine stays high longer
    with pytest.raises(ValueError, match="epochs > 0"):
        lr_lambda(0, 0.01)


def make_scheduled_optimizer(lr0: float = 0.01, epochs: int = 10):
    model = TinyDetector()
    optimizer = smart_optimizer(model, "SGD", lr=lr0, momentum=HYP["momentum"], decay=5e-4)
    lf = lr_lambda(epochs, 0.01)
    return model, optimizer, LambdaLR(optimizer, lr_lambda=lf), lf


def test_warmup_step_endpoints_and_middle():
    _, optimizer, _, lf = make_scheduled_optimizer()
    nw, epoch = 300, 1
    accumulate = warmup_step(optimizer, 0, nw, epoch, lf, HYP, nbs=64, batch_size=16)
    assert accumulate == 1
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.0, 0.0]
    assert all(g["momentum"] == 0.8 for g in optimizer.param_groups)

    target_lr = 0.01 * lf(epoch)
    accumulate = warmup_step(optimizer, nw, nw, epoch, lf, HYP, nbs=64, batch_size=16)
    assert accumulate == 4
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([target_lr] * 3)
    assert all(g["momentum"] == pytest.approx(0.937) for g in optimizer.param_groups)

    accumulate = warmup_step(optimizer, nw // 2, nw, epoch, lf, HYP, nbs=64, batch_size=16)
    assert accumulate == 2  # 1 -> 4 halfway is 2.5, rounded to even as numpy does
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([(0.1 + target_lr) / 2, target_lr / 2, target_lr / 2])
    assert all(type(lr) is float for lr in lrs)  # no numpy scalars in the optimizer state

    before = [g["lr"] for g in optimizer.param_groups]
    assert warmup_step(optimizer, nw + 1, nw, epoch, lf, HYP, nbs=64, batch_size=16) == 4
    assert [g["lr"] for g in optimizer.param_groups] == before  # past the warmup nothing moves


def test_warmup_needs_scheduler_and_lengths():
    model = TinyDetector()
    optimizer = smart_optimizer(model, "SGD", lr=0.01)
    with pytest.raises(KeyError, match="initial_lr"):
        warmup_step(optimizer, 0, 100, 0, lr_lambda(10, 0.01), HYP, 64, 16)
    assert warmup_iterations(HYP, 10) == 100
    assert warmup_iterations(HYP, 50) == 150
    assert scale_weight_decay(5e-4, 16) == pytest.approx(5e-4)
    assert scale_weight_decay(5e-4, 24) == pytest.approx(5e-4 * 24 * 3 / 64)
    assert scale_weight_decay(5e-4, 128) == pytest.approx(1e-3)


def test_optimizer_and_scheduler_state_load_with_weights_only(tmp_path):
    model, optimizer, scheduler, lf = make_scheduled_optimizer()
    warmup_step(optimizer, 37, 100, 0, lf, HYP, nbs=64, batch_size=16)
    model.head(torch.ones(1, 8, 2, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    path = tmp_path / "state.pt"
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    _, optimizer2, scheduler2, _ = make_scheduled_optimizer()
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert scheduler2.last_epoch == 1 and scheduler2.lr_lambdas[0](5) == lf(5)


def test_ema_decay_ramp_float_average_int_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEMA(model, decay=0.9999, tau=2000)
    assert not ema.ema.training and all(not p.requires_grad for p in ema.ema.parameters())
    assert ema.decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema.decay(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))

    start = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8))  # train-mode BN: running stats and num_batches_tracked move
        with torch.no_grad():
            model[0].weight.add_(0.5)
        ema.update(model)
    assert ema.updates == 3
    # replay the three updates by hand
    expected = start["0.weight"]
    for k in range(1, 4):
        d = 0.9999 * (1 - math.exp(-k / 2000))
        expected = d * expected + (1 - d) * (start["0.weight"] + 0.5 * k)
    assert torch.allclose(ema.ema[0].weight, expected, atol=1e-6)
    assert not torch.equal(ema.ema[0].weight, model[0].weight)
    assert int(ema.ema[1].num_batches_tracked) == 3 == int(model[1].num_batches_tracked)


def test_ema_resume_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def train_step(step: int) -> None:
        with torch.no_grad():
            model[0].weight.mul_(0.9).add_(0.01 * step)
        model(torch.randn(3, 4))

    ema = ModelEMA(model)
    for step in range(5):
        train_step(step)
        ema.update(model)
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    restored = ModelEMA(model)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.updates == 5
    for step in range(5, 8):  # both continue identically
        train_step(step)
        ema.update(model)
        restored.update(model)
    for (k, a), b in zip(ema.ema.state_dict().items(), restored.ema.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(KeyError, match="updates"):
        restored.load_state_dict({"model": ema.ema.state_dict()})


def test_ema_update_attr_and_de_parallel():
    model = TinyDetector()
    wrapped = nn.DataParallel(model)
    assert de_parallel(wrapped) is model and de_parallel(model) is model
    ema = ModelEMA(wrapped)
    assert isinstance(ema.ema, TinyDetector)
    model.names, model.hyp = ["x", "y"], {"lr0": 0.01}
    ema.update_attr(wrapped)
    assert ema.ema.names == ["x", "y"] and ema.ema.hyp == {"lr0": 0.01}
    assert ema.ema.names is model.names
    ema.update(wrapped)
    assert ema.updates == 1


def test_clip_gradients():
    model = nn.Linear(10, 10)
    model.weight.grad = torch.full_like(model.weight, 3.0)  # norm 30
    model.bias.grad = torch.zeros_like(model.bias)
    norm = clip_gradients(model, max_norm=10.0)
    assert norm.item() == pytest.approx(30.0)
    assert torch.linalg.vector_norm(model.weight.grad).item() == pytest.approx(10.0, rel=1e-4)
    model.weight.grad = torch.full_like(model.weight, 0.01)  # small gradients are left alone
    clip_gradients(model)
    assert torch.allclose(model.weight.grad, torch.full_like(model.weight, 0.01))
