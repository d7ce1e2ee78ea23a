"""EfficientViT backbone, what is peculiar to it: the released configurations, the native layout,
windows and attention biases, official weights (fixtures, bias resizing), ONNX export, YAML variants.
The generic Backbone contract (shapes, dtypes, gradients, reparameterize, errors) is in
tests/test_backbone_contract.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models.backbones import build_backbone
from models.backbones.efficientvit import (
    ALIASES,
    VARIANTS,
    EfficientViT,
    convert_official_state,
    official_key_to_ours,
)
from models.backbones.efficientvit_blocks import (
    CascadedGroupAttention,
    merge_windows,
    pad_to_windows,
    relative_bias_index,
    resize_bias_table,
    split_windows,
)
from tests.backbone_helpers import (
    MODEL_CONFIGS,
    integer_keys,
    one_thread,  # noqa: F401  (autouse)
    relative_diff,
    save_release,
)
from tests.reference_weights import (
    assert_features_close,
    fill_value,
    load_features,
    load_keys,
    official_state,
)
from utils.general import yaml_load

FIXTURES = ["efficientvit_m0", "efficientvit_m4"]

# The released configurations, copied as numbers from the official classification build.py
# (microsoft/Cream EfficientViT/classification/model/build.py): embed_dim, depth, num_heads, kernels.
OFFICIAL_CONFIGS = {
    "m0": ([64, 128, 192], [1, 2, 3], [4, 4, 4], [5, 5, 5, 5]),
    "m1": ([128, 144, 192], [1, 2, 3], [2, 3, 3], [7, 5, 3, 3]),
    "m2": ([128, 192, 224], [1, 2, 3], [4, 3, 2], [7, 5, 3, 3]),
    "m3": ([128, 240, 320], [1, 2, 3], [4, 3, 4], [5, 5, 5, 5]),
    "m4": ([128, 256, 384], [1, 2, 3], [4, 4, 4], [7, 5, 3, 3]),
    "m5": ([192, 288, 384], [1, 3, 4], [3, 3, 4], [7, 5, 3, 3]),
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def official_key_shapes(variant: str) -> dict[str, list[int]]:
    """Names and shapes of the official classification checkpoint of `variant`, derived from the
    official model structure (224-pixel build: stage maps 14/7/4, window = min(7, map side))."""
    widths, depths, heads, kernels = OFFICIAL_CONFIGS[variant]
    keys: dict[str, list[int]] = {}

    def conv_bn(prefix, cin, cout, k=1, groups=1):
        keys[f"{prefix}.c.weight"] = [cout, cin // groups, k, k]
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.bn.{name}"] = [cout]
        keys[f"{prefix}.bn.num_batches_tracked"] = []

    def ffn(prefix, c):
        conv_bn(f"{prefix}.pw1", c, 2 * c)
        conv_bn(f"{prefix}.pw2", 2 * c, c)

    w0 = widths[0]
    for i, (cin, cout) in enumerate([(3, w0 // 8), (w0 // 8, w0 // 4), (w0 // 4, w0 // 2), (w0 // 2, w0)]):
        conv_bn(f"patch_embed.{2 * i}", cin, cout, 3)
    resolution = 224 // 16
    for s in range(3):
        blocks, first, c = f"blocks{s + 1}", 0, widths[s]
        if s > 0:
            cin, hidden = widths[s - 1], 4 * widths[s - 1]
            conv_bn(f"{blocks}.0.0.m", cin, cin, 3, cin)
            ffn(f"{blocks}.0.1.m", cin)
            conv_bn(f"{blocks}.1.conv1", cin, hidden)
            conv_bn(f"{blocks}.1.conv2", hidden, hidden, 3, hidden)
            se = f"{blocks}.1.se"
            keys.update({f"{se}.fc1.weight": [hidden // 4, hidden, 1, 1], f"{se}.fc1.bias": [hidden // 4],
                         f"{se}.fc2.weight": [hidden, hidden // 4, 1, 1], f"{se}.fc2.bias": [hidden]})
            conv_bn(f"{blocks}.1.conv3", hidden, c)
            conv_bn(f"{blocks}.2.0.m", c, c, 3, c)
            ffn(f"{blocks}.2.1.m", c)
            first, resolution = 3, (resolution - 1) // 2 + 1
        window, nh = min(7, resolution), heads[s]
        for d in range(depths[s]):
            block = f"{blocks}.{first + d}"
            conv_bn(f"{block}.dw0.m", c, c, 3, c)
            ffn(f"{block}.ffn0.m", c)
            attn = f"{block}.mixer.m.attn"
            keys[f"{attn}.attention_biases"] = [nh, window * window]
            keys[f"{attn}.attention_bias_idxs"] = [window * window, window * window]
            for h in range(nh):
                conv_bn(f"{attn}.qkvs.{h}", c // nh, 32 + c // nh)
                conv_bn(f"{attn}.dws.{h}", 16, 16, kernels[h], 16)
            conv_bn(f"{attn}.proj.1", c, c)
            conv_bn(f"{block}.dw1.m", c, c, 3, c)
            ffn(f"{block}.ffn1.m", c)
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"head.bn.{name}"] = [widths[2]]
    keys["head.bn.num_batches_tracked"] = []
    keys.update({"head.l.weight": [1000, widths[2]], "head.l.bias": [1000]})
    return keys


def save_cream_release(tmp_path, state, name="release.pth"):
    """Write `state` the way the authors release it: {'model': state_dict}."""
    return save_release(state, tmp_path / name, "model")


def randomize(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Fill every float tensor by the fixtures' rule (our names), so no BN scale is zero and the BN
    statistics are not the identity: folding and gradients are then non-trivial."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(fill_value(name, tensor.shape, scale))


# --------------------------------------------------------------------------------------------------
# build, names, contract
# --------------------------------------------------------------------------------------------------

def test_variant_config_matches_official_release():
    for variant, (widths, depths, heads, kernels) in OFFICIAL_CONFIGS.items():
        config = VARIANTS[variant]
        ours = (list(config.widths), list(config.depths), list(config.num_heads), list(config.query_kernels))
        assert ours == (widths, depths, heads, kernels), variant


def test_alias_names_are_the_official_constructors_and_release_files():
    assert ALIASES == {**{f"EfficientViT_M{i}": f"m{i}" for i in range(6)},
                       **{f"efficientvit_m{i}": f"m{i}" for i in range(6)}}


@pytest.mark.parametrize("spelling", ["m0", "M0", "m-0", "M_0"])
def test_variant_names_are_case_insensitive(spelling):
    assert EfficientViT(spelling).variant == "m0"


def test_layout_errors_name_the_layout_and_its_strides():
    with pytest.raises(ValueError, match=r"layout='native'.*cannot produce strides \[8\].*\(16, 32, 64\)"):
        EfficientViT("m0", out_strides=[8], layout="native")
    with pytest.raises(ValueError, match=r"unknown layout 'swin'.*detection, native"):
        EfficientViT("m0", layout="swin")
    with pytest.raises(ValueError, match=r"blocks1.0.mixer.m.attn.attention_biases.*\(4, 12\).*not a square"):
        convert_official_state({"blocks1.0.mixer.m.attn.attention_biases": torch.zeros(4, 12)})


def test_native_layout_moves_the_same_stages_to_strides_16_32_64():
    native = EfficientViT("m0", out_strides=[32], layout="native")
    assert native.out_strides == (32,) and native.out_channels == (128,) and len(native.stages) == 2
    detection = EfficientViT("m0", out_strides=[16])
    assert detection.state_dict().keys() == native.state_dict().keys()  # a stride is not a parameter
    assert native.stem[-1].conv.stride == (2, 2) and detection.stem[-1].conv.stride == (1, 1)


def test_native_layout_small_maps_are_padded_not_rejected():
    """At 256 and 320 the native stride-64 map is 4x4 / 5x5, smaller than the 7x7 window on both sides
    (the official downstream code fails there)."""
    model = EfficientViT("m0", layout="native").eval()
    for size in (256, 320):
        with torch.no_grad():
            outputs = model(torch.rand(1, 3, size, size))
        assert [o.shape[-1] for o in outputs] == [-(-size // s) for s in (16, 32, 64)]


# --------------------------------------------------------------------------------------------------
# windows and attention biases
# --------------------------------------------------------------------------------------------------

def test_window_split_merge_round_trip_and_padding():
    x = torch.rand(2, 5, 9, 4)
    padded = pad_to_windows(x, 7)
    assert padded.shape == (2, 5, 14, 7) and torch.equal(padded[:, :, :9, :4], x)
    assert padded[:, :, 9:].abs().sum() == 0 and padded[:, :, :, 4:].abs().sum() == 0
    windows = split_windows(padded, 7)
    assert windows.shape == (4, 5, 7, 7)
    assert torch.equal(windows[1], padded[0, :, 7:14, 0:7])  # row-major windows of image 0
    assert torch.equal(merge_windows(windows, 2, 14, 7), padded)


def test_attention_is_local_to_windows_and_small_maps_match_explicit_padding():
    torch.manual_seed(0)
    attention = CascadedGroupAttention(32, 16, 2, 7, (5, 3)).eval()
    randomize(attention)
    x = torch.rand(1, 32, 14, 14)
    y = attention(x)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0  # top-left window only
    y2 = attention(x2)
    assert not torch.allclose(y[:, :, :7, :7], y2[:, :, :7, :7])
    assert torch.equal(y[:, :, 7:, :], y2[:, :, 7:, :]) and torch.equal(y[:, :, :, 7:], y2[:, :, :, 7:])
    small = torch.rand(1, 32, 4, 3)
    explicit = attention(torch.nn.functional.pad(small, (0, 4, 0, 3)))[:, :, :4, :3]
    assert torch.equal(attention(small), explicit)


def test_bias_index_is_absolute_offset():
    index = relative_bias_index(7)
    assert index.shape == (49, 49)
    # position 0 = (0, 0); position 7 * 2 + 5 = (2, 5): offset (2, 5) -> 2 * 7 + 5
    assert index[0, 19] == 19 and index[19, 0] == 19
    assert index[8, 16] == 1 * 7 + 1  # (1, 1) vs (2, 2)
    assert index.diagonal().eq(0).all() and index.max() == 48


def test_attention_biases_never_go_stale():
    model = EfficientViT("m0", out_strides=[8]).eval()
    randomize(model)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        before = model(x)[0]
        bias = model.stages[0].blocks[0].mixer.attention_biases
        bias.add_(torch.linspace(0.0, 4.0, bias.shape[1]))  # in place, as EMA updates, in eval mode
        after = model(x)[0]
    assert relative_diff(after, before) > 1e-3
    fresh = EfficientViT("m0", out_strides=[8]).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], after)
        double = copy.deepcopy(model).to(torch.float64)
        assert relative_diff(double(x.double())[0], after) < 1e-4
    # A device move carries the index buffer along (meta device: shapes only, no data).
    meta = copy.deepcopy(model).to("meta")
    assert meta.stages[0].blocks[0].mixer.bias_index.device.type == "meta"
    assert meta(torch.rand(1, 3, 64, 64, device="meta"))[0].shape == (1, 64, 8, 8)


def test_state_dict_holds_no_rebuilt_buffers_and_no_weight_decay_names_parameters():
    model = EfficientViT("m4")
    keys = model.state_dict().keys()
    assert not any("bias_index" in k or "input_mean" in k or "input_std" in k for k in keys)
    names = model.no_weight_decay()
    parameters = dict(model.named_parameters())
    assert len(names) == sum(VARIANTS["m4"].depths) and names <= set(parameters)
    assert all(parameters[n].shape == (VARIANTS["m4"].num_heads[0], 49) for n in names)


# --------------------------------------------------------------------------------------------------
# official weights
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("official,ours", [
    ("patch_embed.6.c.weight", "stem.6.conv.weight"),
    ("module.patch_embed.0.bn.bias", "stem.0.bn.bias"),
    ("blocks1.0.mixer.m.attn.dws.2.bn.bias", "stages.0.blocks.0.mixer.query_dw.2.bn.bias"),
    ("blocks2.0.1.m.pw2.c.weight", "stages.1.downsample.before.ffn.project.conv.weight"),
    ("blocks3.1.se.fc1.bias", "stages.2.downsample.merge.se.reduce.bias"),
    ("blocks3.1.conv2.c.weight", "stages.2.downsample.merge.depthwise.conv.weight"),
    ("blocks3.2.0.m.bn.running_var", "stages.2.downsample.after.dw.bn.running_var"),
    ("blocks2.4.mixer.m.attn.proj.1.c.weight", "stages.1.blocks.1.mixer.proj.conv.weight"),
    ("blocks2.3.ffn1.m.pw1.bn.weight", "stages.1.blocks.0.post.ffn.expand.bn.weight"),
    ("blocks1.0.dw0.m.c.weight", "stages.0.blocks.0.pre.dw.conv.weight"),
])
def test_key_conversion_examples(official, ours):
    assert official_key_to_ours(official) == ours


@pytest.mark.parametrize("stem", FIXTURES)
def test_key_generator_matches_fixture_key_list(stem):
    """The test's own official-layout generator reproduces the published key lists exactly."""
    listed = load_keys(stem)
    assert official_key_shapes(listed["variant"].lower()) == listed["keys"]


@pytest.mark.parametrize("stem", FIXTURES)
def test_official_weights_reproduce_official_features(stem, tmp_path):
    listed = load_keys(stem)
    fixture = listed["fixture"]
    reference = load_features(stem)
    overrides = {k: v["backbone"] for k, v in fixture["shape_mismatch_checkpoint_vs_backbone"].items()}
    state = official_state(listed["keys"], fixture["fill_scale"], integer_keys(listed["keys"]), overrides)
    model = EfficientViT(listed["variant"], layout="native", normalize_input=False)
    report = model.load_pretrained(save_cream_release(tmp_path, state))
    assert report.complete and not report.missing and not report.fresh, report.summary()
    assert set(listed["head_keys"]) <= set(report.ignored)
    assert len(report.loaded) == len(model.state_dict())
    model.eval()
    x = torch.from_numpy(reference["input"])
    with torch.no_grad():
        outputs = model(x)
        for out, stride in zip(outputs, model.out_strides):
            assert_features_close(out, reference[f"feat_{stride}"], rel=1e-5, what=f"{stem} feat_{stride}")
        model.reparameterize()
        fused = model(x)
    for out, stride in zip(fused, model.out_strides):
        name = f"fused_feat_{stride}"
        assert_features_close(out, reference[name], rel=1e-5, what=f"{stem} {name}")


@pytest.mark.parametrize("stem", FIXTURES)
def test_release_shaped_stage3_biases_are_resized_like_the_official_loader(stem, tmp_path):
    listed = load_keys(stem)
    reference = load_features(stem)
    key = listed["fixture"]["bias_resize_demo"]["key"]
    table = fill_value(key, listed["keys"][key], listed["fixture"]["fill_scale"])
    np.testing.assert_array_equal(table.numpy(), reference["bias_resize_in"])
    resized = resize_bias_table(table, 7)
    np.testing.assert_allclose(resized.numpy(), reference["bias_resize_out"], rtol=0, atol=1e-7)
    # The full release (4x4 stage-3 tables) loads completely, the resize happening in the loader.
    state = official_state(listed["keys"], listed["fixture"]["fill_scale"], integer_keys(listed["keys"]))
    model = EfficientViT(listed["variant"])
    report = model.load_pretrained(save_cream_release(tmp_path, state))
    assert report.complete and not report.missing, report.summary()
    loaded = model.stages[2].blocks[0].mixer.attention_biases.detach()
    np.testing.assert_allclose(loaded.numpy(), reference["bias_resize_out"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("variant", ["m1", "m2", "m3", "m5"])
def test_variants_without_fixture_load_their_official_layout(variant, tmp_path):
    keys = official_key_shapes(variant)
    state = official_state(keys, 0.05, integer_keys(keys))
    model = EfficientViT(variant)
    report = model.load_pretrained(save_cream_release(tmp_path, state))
    assert report.complete and not report.missing and not report.fresh, report.summary()
    assert {k for k in keys if k.startswith("head.")} <= set(report.ignored)
    assert len(report.loaded) == len(model.state_dict())


def test_partial_backbone_ignores_unbuilt_stage_and_registry_loads_weights(tmp_path):
    keys = official_key_shapes("m0")
    path = save_cream_release(tmp_path, official_state(keys, 0.05, integer_keys(keys)))
    partial = EfficientViT("m0", out_strides=[8, 16])
    report = partial.load_pretrained(path)
    assert report.complete and not report.missing, report.summary()
    assert {k for k in keys if k.startswith("blocks3.")} <= set(report.ignored)
    assert not any(k.startswith("blocks2.") and not k.endswith("_idxs") for k in report.ignored)
    model = build_backbone("EfficientViT_M0", weights=str(path))  # the registry raises unless complete
    converted, _ = convert_official_state(torch.load(path, weights_only=True)["model"])
    assert torch.equal(model.stem[0].conv.weight, converted["stem.0.conv.weight"])
    model.reparameterize()
    with pytest.raises(RuntimeError, match="before reparameterize"):
        model.load_pretrained(path)


# --------------------------------------------------------------------------------------------------
# reparameterisation, gradients of the native layout, YAML variants, export
# --------------------------------------------------------------------------------------------------

def test_reparameterize_folds_every_batch_norm():
    model = EfficientViT("m0").eval()
    model.reparameterize()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_native_layout_gives_every_parameter_a_gradient():
    model = EfficientViT("m0", layout="native").train()
    randomize(model)  # non-zero BN scales, as in a loaded checkpoint: every gradient is then non-zero
    outputs = model(torch.rand(2, 3, 256, 256))
    sum(o.float().mean() for o in outputs).backward()
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


YAMLS = {
    "yolov5-efficientvit.yaml": "m4",
    "yolov5-efficientvit-m0.yaml": "m0",
    "yolov5-efficientvit-m5.yaml": "m5",
}
YAMLS["yolov5-efficientvit-af.yaml"] = YAMLS["yolov5-efficientvit.yaml"]  # with the anchor-free head


def test_every_efficientvit_yaml_is_listed_with_its_variant():
    paths = sorted(MODEL_CONFIGS.glob("yolov5-efficientvit*.yaml"))
    assert {p.name for p in paths} == set(YAMLS)
    for path in paths:
        _, _, name, args = yaml_load(path)["backbone"][0]
        assert name == "EfficientViT" and EfficientViT.resolve_variant(args[0]) == YAMLS[path.name]


@pytest.mark.slow
def test_fused_backbone_exports_to_onnx_and_matches(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = EfficientViT("m0").eval()
    randomize(model)
    model.reparameterize()
    x = torch.rand(1, 3, 256, 320)
    path = tmp_path / "efficientvit_m0.onnx"
    torch.onnx.export(model, (x,), str(path), opset_version=17, input_names=["images"], dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert len(exported) == 3
    for ours, theirs in zip(expected, exported):
        assert relative_diff(torch.from_numpy(theirs), ours) <= 1e-5
