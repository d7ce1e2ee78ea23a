"""Helpers shared by the backbone tests: the contract module and the family test files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from models.backbones import BACKBONES, Backbone
from utils.general import yaml_load

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = ROOT / "configs" / "models"
ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CI box shares 2 cores among many jobs: one intra-op thread avoids oversubscription.

    Import it into a test module (`from tests.backbone_helpers import one_thread  # noqa: F401`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- numbers ------------------------------------------------------------------------------------

def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, in float32."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb_(model: nn.Module, seed: int = 0, scale: float = 0.02) -> nn.Module:
    """Move a fresh model away from its initialisation, in place, as a trained checkpoint would be.

    Every parameter gets `scale` Gaussian noise (so zero-initialised BN scales, biases and tiny layer
    scales stop hiding a wrong fold or a missing gradient) and every BatchNorm gets running statistics
    far from the identity (mean ~0.1, var in [0.5, 1.5)). Returns the model.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_((scale * noise).to(parameter.dtype))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
    return model


def random_projection(outputs: Sequence[torch.Tensor], seed: int = 1) -> torch.Tensor:
    """A scalar that depends on every output element: sum(o * r) with fixed random r.

    (A plain sum or mean of a normalised map is constant and would give zero gradients.)"""
    generator = torch.Generator().manual_seed(seed)
    return sum((o.float() * torch.randn(o.shape, generator=generator)).sum() for o in outputs)


def parameters_without_gradient(model: nn.Module, nonzero: bool = False) -> list[str]:
    """Names of trainable parameters whose .grad is missing or not finite (or all zero, if `nonzero`)."""
    bad = []
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        if not parameter.requires_grad:
            continue
        if grad is None or not torch.isfinite(grad).all() or (nonzero and not grad.abs().sum() > 0):
            bad.append(name)
    return bad


# -- official release files --------------------------------------------------------------------

def save_release(state: dict[str, torch.Tensor], path: Path, top_level_key: str | None = "model",
                 **extra) -> Path:
    """Write `state` the way the authors release it: {top_level_key: state_dict, **extra}
    (or the bare state_dict when top_level_key is None)."""
    torch.save(state if top_level_key is None else {top_level_key: state, **extra}, path)
    return path


def integer_keys(keys: Iterable[str]) -> set[str]:
    """The integer entries of an official state_dict (BN counters, attention-bias index buffers)."""
    return {k for k in keys if k.endswith(("num_batches_tracked", "attention_bias_idxs"))}


# -- families and model YAMLs ------------------------------------------------------------------

def registered_families() -> dict[str, type[Backbone]]:
    """{family name: class} of every family registered under its own name."""
    families = {}
    for name in BACKBONES.names():
        entry = BACKBONES.get(name)
        if entry.variant is None and entry.cls.family == name:
            families[name] = entry.cls
    return families


def yaml_backbone_family(path: Path) -> str | None:
    """The family of the backbone row of a model YAML (None for a plain YOLOv5 YAML)."""
    name = yaml_load(path)["backbone"][0][2]
    return BACKBONES.get(name).cls.family if name in BACKBONES else None


def detection_yaml(backbone: str, variant: str, nc: int = 3) -> dict:
    """A detection model dict with the shipped backbone YAMLs' neck and head (YOLOv5n widths) on
    `backbone`: reads the backbone's strides 8, 16 and 32 (slots 2, 3, 4)."""
    head = [
        [-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],  # 6, 7
        [[-1, 3], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],  # 8 (P4), 9
        [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],  # 10, 11
        [[-1, 2], 1, "Concat", [1]], [-1, 3, "C3", [256, False]],  # 12 (P3), 13
        [-1, 1, "Conv", [256, 3, 2]], [[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],  # 14-16
        [-1, 1, "Conv", [512, 3, 2]], [[-1, 6], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]],  # 17-19
        [[13, 16, 19], 1, "Detect", ["nc", "anchors"]],  # 20
    ]
    return {"nc": nc, "depth_multiple": 0.33, "width_multiple": 0.25, "anchors": ANCHORS,
            "backbone": [[-1, 1, backbone, [variant]], [-1, 1, "SPPF", [1024, 5]]], "head": head}


def training_loss(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The loss of a DetectionModel in train mode on `images` with two boxes per image (YOLOv5's for
    Detect, the anchor-free loss for DetectAF)."""
    from utils.loss import scale_loss_gains
    from utils.loss_af import build_criterion

    hyp = yaml_load(ROOT / "configs" / "hyps" / "hyp.scratch-low.yaml")
    model.hyp = scale_loss_gains(hyp, nl=model.model[-1].nl, nc=model.nc, imgsz=images.shape[-1])
    boxes = [[0, 0.5, 0.5, 0.3, 0.4], [min(1, model.nc - 1), 0.25, 0.7, 0.2, 0.2]]
    targets = torch.tensor([[i, *box] for i in range(images.shape[0]) for box in boxes])
    loss, _ = build_criterion(model)(model(images), targets)
    return loss
