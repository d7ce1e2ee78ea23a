"""The TorchVision backbone node against torchvision's own feature extraction (offline, random weights).

A randomly initialised torchvision classification model is saved as a file, loaded into our node
(`weights=`), and the node's maps are compared with torchvision's `create_feature_extractor` on the
same model at the modules our node found, at a square and a rectangular size.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.backbones import build_backbone
from models.yolo import DetectionModel
from tests.backbone_helpers import (
    detection_yaml,
    one_thread,  # noqa: F401
    parameters_without_gradient,
    perturb_,
    relative_diff,
    training_loss,
)

torchvision = pytest.importorskip("torchvision")
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

SLOW = pytest.mark.slow
MODELS = [pytest.param("resnet18", id="resnet18"),
          *(pytest.param(n, id=n, marks=SLOW)
            for n in ("mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny"))]
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
            torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


@pytest.mark.parametrize("name", MODELS)
def test_maps_equal_torchvisions_own_feature_extractor(name, tmp_path):
    torch.manual_seed(0)
    reference = perturb_(torchvision.models.get_model(name, weights=None), scale=0.01).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    node = build_backbone("TorchVision", name, out_strides=(8, 16, 32), weights=str(path)).eval()
    nodes = [f.module[len("model."):] for f in node.out_features]
    extractor = create_feature_extractor(reference, return_nodes=nodes).eval()
    for height, width in [(64, 64), (64, 96)]:
        x = torch.rand(1, 3, height, width)
        with torch.no_grad():
            ours = node(x)
            theirs = list(extractor((x - IMAGENET[0]) / IMAGENET[1]).values())
        assert [tuple(o.shape[-2:]) for o in ours] == [(math.ceil(height / s), math.ceil(width / s))
                                                       for s in (8, 16, 32)]
        assert all(relative_diff(o, t) <= 1e-5 for o, t in zip(ours, theirs))


def test_report_ignores_the_classifier_and_refuses_another_model(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    node = build_backbone("TorchVision", "resnet18", out_strides=(8, 16))
    report = node.load_pretrained(tmp_path / "r18.pth")
    assert report.complete and "fc.weight" in report.ignored
    assert any(k.startswith("layer4.") for k in report.ignored)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(RuntimeError, match="did not load cleanly"):
        build_backbone("TorchVision", "resnet18", weights=str(tmp_path / "r34.pth"))


def test_enum_weights_offline_say_how_to_pass_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"could not download ResNet18_Weights.IMAGENET1K_V1.*pass the"):
        build_backbone("TorchVision", "resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"neither a file nor one of \['IMAGENET1K_V1', 'DEFAULT'\]"):
        build_backbone("TorchVision", "resnet18", weights="IMAGENET_V9")


def test_models_that_are_not_a_chain_are_refused():
    with pytest.raises(ValueError, match="TorchVision vit_b_16: .*do not run as a chain"):
        build_backbone("TorchVision", "vit_b_16")
    with pytest.raises(ValueError, match=r"unknown variant 'resnet19'; known: any classification model"):
        build_backbone("TorchVision", "resnet19")


@pytest.mark.slow
def test_torchvision_yaml_trains_and_fuses():
    torch.manual_seed(0)
    model = DetectionModel(detection_yaml("TorchVision", "mobilenet_v3_small"), nc=3)
    training_loss(model.train(), torch.rand(2, 3, 64, 96)).backward()
    assert parameters_without_gradient(model) == []
    perturb_(model, scale=0.01).eval()
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse()
        after = model(x)[0]
    assert relative_diff(after, before) <= 1e-4
