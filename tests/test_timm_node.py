"""The Timm backbone node against timm's own `features_only` models (offline, random weights).

Each case saves a randomly initialised timm classification model's state_dict (BN statistics moved
away from the identity, so that a load that skips them shows) as the file a user would download,
loads it into our node (`weights=`) and into timm's own `features_only=True` model
(`pretrained_cfg_overlay=dict(file=...)`), and compares the stride 8/16/32 maps at a square and a
rectangular size within 1e-5 relative. Plain ViTs compare the stride-16 map that feeds the pyramid.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.backbones import build_backbone
from models.backbones.foreign import read_safetensors
from models.backbones.timm_node import Timm
from tests.backbone_helpers import one_thread, perturb_, relative_diff  # noqa: F401

timm = pytest.importorskip("timm")

SLOW = pytest.mark.slow
MODELS = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "convnext_atto", "repvit_m1",
          "fastvit_t8", "mobilevitv2_050", "edgenext_xx_small", "pvt_v2_b0", "fasternet_t0",
          "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"]
QUICK = {"resnet18", "convnext_atto", "vit_tiny_patch16_224"}
# MobileViT's maps are ceil(H / s) only for sides that are multiples of 64 (the node pads, timm does not)
SIZES = {"mobilevitv2_050": [(64, 64), (64, 128)]}
DEFAULT_SIZES = [(64, 64), (64, 96)]


def _cases() -> list:
    return [pytest.param(name, id=name, marks=() if name in QUICK else SLOW) for name in MODELS]


def save_classifier(name: str, path, seed: int = 0) -> str:
    """A random timm classification checkpoint of `name`, saved as a plain state_dict."""
    torch.manual_seed(seed)
    model = perturb_(timm.create_model(name, pretrained=False), seed=seed, scale=0.01)
    torch.save(model.state_dict(), path)
    return str(path)


def timm_reference(node: Timm, path: str) -> torch.nn.Module:
    """timm's own features_only model of the node's maps, loaded by timm from the same file."""
    probe = node._feature_options["probe"]
    indices = (probe.indices[16],) if node.plain else tuple(probe.indices[s] for s in node.out_strides)
    return timm.create_model(node.timm_name, features_only=True, out_indices=indices, pretrained=True,
                             pretrained_cfg_overlay={"file": path}, **probe.create_kwargs).eval()


def our_maps(node: Timm, x: torch.Tensor) -> list[torch.Tensor]:
    """Our node's maps, or for a plain ViT the stride-16 map that feeds its pyramid."""
    if not node.plain:
        return node(x)
    captured = []
    hook = node.pyramid.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        node(x)
    finally:
        hook.remove()
    return captured


@pytest.mark.parametrize("name", _cases())
def test_maps_equal_timms_own_features_model(name, tmp_path):
    path = save_classifier(name, tmp_path / f"{name}.pth")
    node = build_backbone("Timm", name, out_strides=(8, 16, 32), weights=path).eval()
    reference = timm_reference(node, path)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in node.input_statistics)
    for height, width in SIZES.get(name, DEFAULT_SIZES):
        x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height + width))
        with torch.no_grad():
            ours = our_maps(node, x)
            theirs = [m.permute(0, 3, 1, 2) if node.channels_last else m for m in reference((x - mean) / std)]
        assert len(ours) == len(theirs)
        for o, t in zip(ours, theirs):
            assert o.shape == t.shape, (height, width)
            assert relative_diff(o, t) <= 1e-5, (height, width, relative_diff(o, t))
        with torch.no_grad():
            shapes = [tuple(m.shape[-2:]) for m in node(x)]
        assert shapes == [(math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32)]


def test_load_report_ignores_head_and_unbuilt_stages_and_plain_vit_pyramid_is_fresh(tmp_path):
    path = save_classifier("convnext_atto", tmp_path / "c.pth")
    node = build_backbone("Timm", "convnext_atto", out_strides=(8, 16))
    report = node.load_pretrained(path)
    assert report.complete and not report.fresh
    assert "head.fc.weight" in report.ignored and any(k.startswith("stages.3.") for k in report.ignored)
    assert not any(key.startswith("body.stages_3") for key in node.state_dict())  # stride 32 not built
    vit_path = save_classifier("vit_tiny_patch16_224", tmp_path / "v.pth")
    vit = build_backbone("Timm", "vit_tiny_patch16_224")
    vit_report = vit.load_pretrained(vit_path)
    assert vit_report.complete and vit_report.loaded
    assert set(vit_report.fresh) == {k for k in vit.state_dict() if k.startswith("pyramid.")
                                     and not k.endswith("num_batches_tracked")}
    assert "pyramid" in vit_report.summary() and "initialised fresh" in vit_report.summary()


def test_an_incomplete_or_foreign_file_is_refused(tmp_path):
    other = save_classifier("resnet18", tmp_path / "r.pth")
    with pytest.raises(RuntimeError, match="did not load cleanly.*UNEXPECTED"):
        build_backbone("Timm", "convnext_atto", weights=other)
    state = torch.load(save_classifier("convnext_atto", tmp_path / "c.pth"), weights_only=True)
    state.pop("stages.1.blocks.0.conv_dw.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"MISSING 1: body\.stages_1\.blocks\.0\.conv_dw\.weight"):
        build_backbone("Timm", "convnext_atto", weights=tmp_path / "partial.pth")


def write_safetensors(state: dict[str, torch.Tensor], path) -> None:
    """A minimal .safetensors writer for the test (the package is not a dependency)."""
    import json
    import struct

    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for key, value in state.items():
        data = value.contiguous().numpy().tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_safetensors_files_load_like_pth(tmp_path):
    pth = save_classifier("convnext_atto", tmp_path / "c.pth")
    state = torch.load(pth, weights_only=True)
    write_safetensors(state, tmp_path / "model.safetensors")
    back = read_safetensors(tmp_path / "model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    a = build_backbone("Timm", "convnext_atto", weights=pth).eval()
    b = build_backbone("Timm", "convnext_atto", weights=tmp_path / "model.safetensors").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(a(x), b(x)))


def test_yaml_mapping_options_and_drop_path(tmp_path):
    node = build_backbone("Timm", None, model="convnext_atto", drop_path=0.1, normalize_input=False)
    assert node.timm_name == "convnext_atto" and node.drop_path_rate == 0.1
    rates = [m.drop_prob for m in node.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)  # timm's linear schedule over the full model's blocks
    assert not node.normalize_input
    same = build_backbone("Timm", "convnext_atto", drop_path_rate=0.1)
    assert [m.drop_prob for m in same.modules() if type(m).__name__ == "DropPath"] == rates


def test_model_statistics_come_from_timm(tmp_path):
    vit = build_backbone("Timm", "vit_tiny_patch16_224")
    assert vit.input_statistics == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.equal(vit.input_mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_unknown_model_fixed_size_and_stride_errors_name_the_model():
    with pytest.raises(ValueError, match=r"unknown variant 'convnext_atoo'.*did you mean convnext_atto"):
        build_backbone("Timm", "convnext_atoo")
    with pytest.raises(ValueError, match=r"efficientformerv2_s0: cannot run at 128x96 .*built for 224x224"):
        build_backbone("Timm", "efficientformerv2_s0")
    with pytest.raises(ValueError, match=r"Timm-shvit_s1.*cannot produce strides \[8\].*produces \(16, 32\)"):
        build_backbone("Timm", "shvit_s1", out_strides=(8, 16, 32))
    with pytest.raises(ValueError, match=r"patch14_dinov2: feature strides \[14\] are not powers of two"):
        build_backbone("Timm", "vit_small_patch14_dinov2")


def test_pretrained_true_offline_says_how_to_pass_a_file(monkeypatch):
    """timm's download fails as it does offline (simulated: a real attempt waits for network timeouts)."""
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch.*weights: path/to/model.safetensors"):
        build_backbone("Timm", "convnext_atto", pretrained=True)


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "mambaout_femto"])
def test_channels_last_models_return_nchw(name):
    node = build_backbone("Timm", name).eval()
    assert node.channels_last
    with torch.no_grad():
        maps = node(torch.rand(1, 3, 64, 96))
    assert [tuple(m.shape[1:]) for m in maps] == [(c, math.ceil(64 / s), math.ceil(96 / s))
                                                  for c, s in zip(node.out_channels, node.out_strides)]


def test_drop_path_keeps_every_parameter_in_the_graph():
    from tests.backbone_helpers import parameters_without_gradient, random_projection

    torch.manual_seed(0)
    node = build_backbone("Timm", "convnext_atto", drop_path=0.5).train()
    random_projection(node(torch.rand(2, 3, 64, 64))).backward()
    assert parameters_without_gradient(node) == []  # timm multiplies a dropped branch by 0


def test_layer_decay_depths_follow_timms_block_grouping():
    node = build_backbone("Timm", "convnext_atto")
    depths, total = node.layer_depths()
    assert set(depths) == {name for name, _ in node.named_parameters()}
    assert depths["body.stem_0.weight"] == 0
    blocks = sorted({depths[n] for n in depths if ".blocks." in n})
    assert blocks == list(range(blocks[0], blocks[-1] + 1)) and blocks[-1] < total
    assert depths["body.stages_3.blocks.1.conv_dw.weight"] > depths["body.stages_0.blocks.0.conv_dw.weight"]


@pytest.mark.parametrize("name, strides", [("efficientnet_b0", (8, 16)), ("mobilevitv2_050", (8,)),
                                           ("resnet18", (16,))])
def test_only_what_the_yaml_reads_is_built_and_trains(name, strides, tmp_path):
    """timm's EfficientNet feature class builds every block: the node drops those after the deepest map
    (they would get no gradient, which stalls DDP); their file tensors are ignored, not unexpected."""
    from tests.backbone_helpers import parameters_without_gradient, random_projection

    torch.manual_seed(0)
    path = save_classifier(name, tmp_path / f"{name}.pth")
    node = build_backbone("Timm", name, out_strides=strides, weights=path).train()
    assert node.out_strides == strides
    random_projection(node(torch.rand(2, 3, 64, 64))).backward()
    assert parameters_without_gradient(node) == []
    full = build_backbone("Timm", name, out_strides=(8, 16, 32))
    assert sum(p.numel() for p in node.parameters()) < sum(p.numel() for p in full.parameters())
