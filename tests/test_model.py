"""The YAML model graph: YOLOv5 parity, backbone slots, fuse, info and build-time errors."""

from __future__ import annotations

import copy

import pytest
import torch

from models.backbones import BACKBONES, Registry, available, build_backbone
from models.yolo import DetectionModel, ModelConfigError
from tests.toy_backbones import ToyPyramid, toy_yaml

YOLOV5_PARAMS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557, "l": 46_563_709, "x": 86_749_405}


@pytest.fixture()
def toy_registered():
    with BACKBONES.temporarily("ToyPyramid", ToyPyramid):
        yield


@pytest.mark.parametrize("size", list(YOLOV5_PARAMS))
def test_yolov5_parameter_counts_match_reference(size):
    model = DetectionModel(f"yolov5{size}.yaml")
    assert sum(p.numel() for p in model.parameters()) == YOLOV5_PARAMS[size]


def test_yolov5s_state_dict_uses_yolov5_keys_and_loads_strictly():
    model = DetectionModel("yolov5s")
    sd = model.state_dict()
    expected_shapes = {
        "model.0.conv.weight": (32, 3, 6, 6),
        "model.0.bn.running_var": (32,),
        "model.2.m.0.cv1.conv.weight": (32, 32, 1, 1),
        "model.8.cv3.conv.weight": (512, 512, 1, 1),
        "model.9.cv2.conv.weight": (512, 1024, 1, 1),
        "model.24.anchors": (3, 3, 2),
        "model.24.m.0.weight": (255, 128, 1, 1),
        "model.24.m.2.bias": (255,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 57  # one per BatchNorm2d of YOLOv5s
    assert not any("stride" in k for k in sd)  # strides are derived, not stored
    clone = DetectionModel("yolov5s")
    clone.load_state_dict(sd, strict=True)
    assert torch.equal(clone.model[24].anchors, model.model[24].anchors)


def test_eval_output_shape_and_strides_plain_model():
    model = DetectionModel("yolov5n.yaml").eval()
    with torch.no_grad():
        pred, maps = model(torch.rand(1, 3, 640, 640))
    assert pred.shape == (1, 25200, 85)
    assert [tuple(m.shape) for m in maps] == [(1, 3, 80, 80, 85), (1, 3, 40, 40, 85), (1, 3, 20, 20, 85)]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    # anchors are stored in stride units, as YOLOv5 does after building
    assert torch.allclose(model.model[-1].anchors[0, 0], torch.tensor([10 / 8, 13 / 8]))


def test_train_mode_returns_raw_maps_with_rectangular_input():
    model = DetectionModel("yolov5n.yaml").train()
    maps = model(torch.rand(2, 3, 640, 512))
    assert [tuple(m.shape) for m in maps] == [(2, 3, 80, 64, 85), (2, 3, 40, 32, 85), (2, 3, 20, 16, 85)]


def test_decode_matches_yolov5_formula():
    model = DetectionModel("yolov5n.yaml").eval()
    detect = model.model[-1]
    logits = torch.randn(1, detect.na, 2, 3, detect.no)
    decoded = detect._decode(logits, 1).view(1, detect.na, 2, 3, detect.no)
    s = logits.sigmoid()
    a, cy, cx = 2, 1, 2
    stride = 16.0
    anchor_px = detect.anchors[1, a] * stride
    assert torch.allclose(decoded[0, a, cy, cx, 0], (s[0, a, cy, cx, 0] * 2 + cx - 0.5) * stride)
    assert torch.allclose(decoded[0, a, cy, cx, 1], (s[0, a, cy, cx, 1] * 2 + cy - 0.5) * stride)
    assert torch.allclose(decoded[0, a, cy, cx, 2:4], (s[0, a, cy, cx, 2:4] * 2) ** 2 * anchor_px)
    assert torch.allclose(decoded[..., 4:], s[..., 4:])


@pytest.mark.parametrize("shape", [(640, 640), (640, 512)])
def test_fuse_changes_no_output(shape):
    model = DetectionModel("yolov5s.yaml").eval()
    x = torch.rand(1, 3, *shape)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse()
        after = model(x)[0]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert sum(p.numel() for p in model.parameters()) == 7_225_885


def test_info_reports_gflops_at_real_input_size():
    model = DetectionModel("yolov5s.yaml")
    info = model.info(640)
    assert abs(info["gflops"] - 16.5) <= 0.2
    assert info["parameters"] == info["gradients"] == YOLOV5_PARAMS["s"]
    assert model.info((320, 320))["gflops"] == pytest.approx(info["gflops"] / 4, rel=0.01)


def test_nc_override_and_bare_names():
    model = DetectionModel("yolov5n", nc=3)
    assert model.nc == 3 and model.model[-1].no == 8
    with pytest.raises(FileNotFoundError, match="yolov5s.yaml"):
        DetectionModel("yolov5ss.yaml")


# -- backbone slots ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["p3", "p4"])
def test_backbone_node_fills_slots_by_declared_stride(toy_registered, variant):
    model = DetectionModel(toy_yaml(variant)).eval()
    backbone = model.model[0]
    assert isinstance(backbone, ToyPyramid)
    # the YAML reads slots 2, 3 and 4 only, so the backbone is asked for strides 8/16/32
    assert backbone.out_strides == (8, 16, 32)
    assert [model.model[k].channels for k in range(1, 5)] == [None, 16, 24, 32]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    with torch.no_grad():
        pred, _ = model(torch.rand(1, 3, 320, 256))
    assert pred.shape == (1, 3 * (40 * 32 + 20 * 16 + 10 * 8), 8)
    assert [type(model.model[k]).__name__ for k in range(1, 6)] == ["BackboneSlot"] * 4 + ["SPPF"]
    assert any(k.startswith("model.0.stages") for k in model.state_dict())
    assert any(k.startswith("model.5.cv1") for k in model.state_dict())


def test_stride4_slot_readable_when_backbone_emits_it(toy_registered):
    cfg = toy_yaml("p4")
    cfg["head"].insert(-1, [1, 1, "Conv", [8, 3, 2]])  # row 13 reads slot 1 (stride 4); Detect stays last
    model = DetectionModel(cfg)
    assert model.model[0].out_strides == (4, 8, 16, 32)
    assert model.model[13].f == 1 and 1 in model.save


def test_row_reading_empty_slot_is_an_error_naming_the_row(toy_registered):
    cfg = toy_yaml("p3", p3_slot=1)  # row 11 reads slot 1 (stride 4), which p3 does not produce
    with pytest.raises(ModelConfigError, match=r"row 0 .*ToyPyramid.*row 11 reads slot 1"):
        DetectionModel(cfg)


def test_backbone_lying_about_channels_is_an_error(toy_registered):
    cfg = toy_yaml("p3")
    cfg["backbone"][0] = [-1, 1, "ToyPyramid", [{"arch": "p3", "lie_about_channels": True}]]
    with pytest.raises(ModelConfigError, match=r"ToyPyramid .*declares stride 8 with 17 channels"):
        DetectionModel(cfg)


def test_unknown_module_lists_close_matches():
    cfg = DetectionModel("yolov5n").yaml
    cfg = copy.deepcopy(cfg)
    cfg["head"][3] = [-1, 3, "C3x2", [512, False]]
    with pytest.raises(ModelConfigError, match=r"row 13 .*unknown module 'C3x2'.*Did you mean C3"):
        DetectionModel(cfg)


@pytest.mark.parametrize(
    "row, message",
    [
        ([-1, 1, "Conv"], r"expected \[from, number, module, args\]"),
        ([-1, 0, "Conv", [64, 3, 2]], r"'number' must be a positive int"),
        ([30, 1, "Conv", [64, 3, 2]], r"'from' 30 must name earlier layers"),
        ([-1, 1, "Conv", 64], r"'args' must be a list"),
    ],
)
def test_malformed_rows_name_the_row(row, message):
    cfg = copy.deepcopy(DetectionModel("yolov5n").yaml)
    cfg["head"][0] = row
    with pytest.raises(ModelConfigError, match=r"row 10 .*" + message):
        DetectionModel(cfg)


def test_backbone_must_be_first_row(toy_registered):
    cfg = toy_yaml("p3")
    cfg["backbone"] = [[-1, 1, "Conv", [8, 3, 2]]] + cfg["backbone"]
    with pytest.raises(ModelConfigError, match=r"row 1 .*must be the first row"):
        DetectionModel(cfg)


# -- registry -----------------------------------------------------------------------------------

def test_registry_fails_loudly_on_duplicates_and_unknown_names():
    registry = Registry()
    registry.add("ToyPyramid", ToyPyramid)
    with pytest.raises(KeyError, match="registered twice"):
        registry.add("ToyPyramid", ToyPyramid)
    with pytest.raises(KeyError, match=r"unknown backbone 'ToyPyramd'.*Did you mean ToyPyramid"):
        registry.get("ToyPyramd")
    with pytest.raises(TypeError, match="not a Backbone"):
        registry.add("Conv", torch.nn.Conv2d)


def test_registry_aliases_bind_variants_and_match_case_insensitively():
    registry = Registry()
    registry.add("Toy_P4", ToyPyramid, "P4")
    assert registry.build("Toy_P4").out_strides == (4, 8, 16, 32)
    with pytest.raises(ValueError, match="bound to variant 'p4'"):
        registry.build("Toy_P4", "p3")
    with pytest.raises(ValueError, match=r"unknown variant 'p9'; known: p4, p3"):
        ToyPyramid("p9")


def test_public_entry_points(toy_registered):
    assert "ToyPyramid" in available()
    backbone = build_backbone("ToyPyramid", "P3")
    assert backbone.output_shape() == {8: 16, 16: 24, 32: 32}
    with pytest.raises(KeyError, match="unknown backbone"):
        build_backbone("NoSuchNet", "x")
