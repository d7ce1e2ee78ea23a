"""Timm backbone nodes in detection models: build from a YAML, train a step, fuse exactly, save and
rebuild offline, export to ONNX verified, for every timm model of test_timm_node.py (CNNs with BN folds,
timm reparameterisation, channels-last outputs, hierarchical transformers, a plain ViT)."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint import checkpoint_dict, load_checkpoint, load_detection_model, save_checkpoint
from models.yolo import DetectionModel
from tests.backbone_helpers import (
    count_parameters,
    detection_yaml,
    one_thread,  # noqa: F401
    parameters_without_gradient,
    perturb_,
    relative_diff,
    training_loss,
)

pytest.importorskip("timm")

SLOW = pytest.mark.slow
CHAIN = [pytest.param("convnext_atto", id="convnext_atto"),
         *(pytest.param(name, id=name, marks=SLOW) for name in
           ("resnet18", "repvit_m1", "fastvit_t8", "efficientnet_b0", "swin_tiny_patch4_window7_224",
            "vit_tiny_patch16_224", "mobilenetv3_small_100", "regnetx_002", "mobilevitv2_050",
            "edgenext_xx_small", "pvt_v2_b0", "fasternet_t0"))]


@pytest.mark.parametrize("name", CHAIN)
def test_timm_yaml_trains_fuses_and_exports(name, tmp_path):
    from engine.exporter import RELATIVE_TOLERANCE, export_and_verify

    torch.manual_seed(0)
    model = DetectionModel(detection_yaml("Timm", name), nc=3)
    assert model.model[0].out_strides == (8, 16, 32) and model.stride.tolist() == [8.0, 16.0, 32.0]
    training_loss(model.train(), torch.rand(2, 3, 64, 96)).backward()
    assert parameters_without_gradient(model) == []
    perturb_(model, scale=0.01).eval()
    path = save_checkpoint(checkpoint_dict(model), tmp_path / "w.pt")
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        before = model(x)[0]
        params = count_parameters(model)
        model.fuse()
        after = model(x)[0]
    assert count_parameters(model) <= params and relative_diff(after, before) <= 1e-4
    ckpt = load_checkpoint(path)
    assert ckpt["backbone"]["timm_model"] == name
    rebuilt = load_detection_model(path, fuse=False)
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], before)
    results = export_and_verify(path, include=("onnx",), imgsz=64)
    assert results["onnx"].checks[0].relative_diff <= RELATIVE_TOLERANCE


def test_fuse_folds_conv_bn_and_runs_timms_reparameterisation():
    from models.backbones import build_backbone

    torch.manual_seed(0)
    resnet = perturb_(build_backbone("Timm", "resnet18")).eval()
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules())
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = resnet(x)
        resnet.reparameterize()
        after = resnet(x)
    assert bns > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules())
    assert all(relative_diff(a, b) <= 1e-5 for a, b in zip(after, before))
    repvit = perturb_(build_backbone("Timm", "repvit_m1")).eval()
    with torch.no_grad():
        before = repvit(x)
        repvit.reparameterize()
        after = repvit(x)
    assert not any(hasattr(m, "fuse") for m in repvit.body.modules() if m is not repvit.body)
    assert all(relative_diff(a, b) <= 1e-5 for a, b in zip(after, before))


def test_checkpoint_yaml_rebuilds_without_files_or_network(tmp_path):
    from engine.checkpoint import plain_yaml

    d = detection_yaml("Timm", "convnext_atto")
    d["backbone"][0][3] = [{"model": "convnext_atto", "weights": "gone.safetensors", "pretrained": True,
                            "drop_path": 0.1}]
    plain = plain_yaml(d)
    assert plain["backbone"][0][3] == [{"model": "convnext_atto", "pretrained": False, "drop_path": 0.1}]
    model = DetectionModel(plain)  # no file, no download
    assert model.model[0].drop_path_rate == 0.1
    record = checkpoint_dict(model)["backbone"]
    assert record == {"name": "Timm", "plugin": None, "timm_model": "convnext_atto",
                      "timm_version": __import__("timm").__version__, "drop_path_rate": 0.1}


def test_finetuning_hyps_and_freeze_work_on_a_timm_node():
    from engine.weights import freeze_layers, model_config_with_drop_path, parameter_lr_scales

    config = model_config_with_drop_path(detection_yaml("Timm", "convnext_atto"), 0.2)
    model = DetectionModel(config)
    assert model.model[0].drop_path_rate == 0.2
    scales = parameter_lr_scales(model, backbone_lr_mult=0.5, layer_decay=0.9)
    stem, last = scales["model.0.body.stem_0.weight"], scales["model.0.body.stages_3.blocks.1.conv_dw.weight"]
    assert stem < last <= 0.5 * 0.9 and all(name.startswith("model.0.") for name in scales)
    frozen = freeze_layers(model, ["backbone"])
    assert frozen and all(name.startswith("model.0.") for name in frozen)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.0."))


def test_dynamic_export_of_a_plain_vit_is_refused_before_writing(tmp_path):
    from engine.exporter import RELATIVE_TOLERANCE, export_and_verify

    torch.manual_seed(0)
    vit_model = DetectionModel(detection_yaml("Timm", "vit_tiny_patch16_224"), nc=3)
    vit = save_checkpoint(checkpoint_dict(vit_model), tmp_path / "vit.pt")
    with pytest.raises(ValueError, match=r"--dynamic: .*vit.pt: Timm vit_tiny_patch16_224 resamples its "
                                         r"position embeddings .*export it at a fixed size"):
        export_and_verify(vit, include=("onnx",), imgsz=64, dynamic=True)
    assert not (tmp_path / "vit.onnx").exists()
    cnn = save_checkpoint(checkpoint_dict(DetectionModel(detection_yaml("Timm", "convnext_atto"), nc=3)),
                          tmp_path / "cnn.pt")
    results = export_and_verify(cnn, include=("onnx",), imgsz=64, dynamic=True)  # other sizes verified
    assert len(results["onnx"].checks) > 1
    assert all(check.relative_diff <= RELATIVE_TOLERANCE for check in results["onnx"].checks)
