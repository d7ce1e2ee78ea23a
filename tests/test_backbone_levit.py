"""LeViT backbone, what is peculiar to it: the official specification and drop-path recipe, the
detection and official layouts, attention biases at any map size, official weights (fixture features),
YAML rows. The generic Backbone contract (shapes, dtypes, gradients, reparameterize, errors) is in
tests/test_backbone_contract.py."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from models.backbones import build_backbone
from models.backbones.layers import DropPath
from models.backbones.levit import (
    ALIASES,
    VARIANTS,
    LeViT,
    convert_official_state,
    official_module_map,
)
from models.backbones.levit_blocks import Attention, AttentionSubsample, relative_position_bias
from tests.backbone_helpers import (
    MODEL_CONFIGS,
    integer_keys,
    one_thread,  # noqa: F401  (autouse)
    relative_diff,
)
from tests.reference_weights import assert_features_close, load_features, load_keys, official_state
from utils.general import yaml_load

FIXTURE = "levit_128s"

# The `specification` table of the official levit.py (facebookresearch/LeViT), as written there:
# C widths, D key dim, N heads, X depths, drop_path.
OFFICIAL_SPEC = {
    "128s": ("128_256_384", 16, "4_6_8", "2_3_4", 0),
    "128": ("128_256_384", 16, "4_8_12", "4_4_4", 0),
    "192": ("192_288_384", 32, "3_5_6", "4_4_4", 0),
    "256": ("256_384_512", 32, "4_6_8", "4_4_4", 0),
    "384": ("384_512_768", 32, "6_9_12", "4_4_4", 0.1),
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("_"))


def official_key_shapes(variant: str) -> dict[str, list[int]]:
    """Names and shapes of the official LeViT checkpoint, derived the way levit.py builds the model
    (224 input: stage sides 14, 7, 4; distillation head included)."""
    widths, key_dim, heads, depths = _numbers(OFFICIAL_SPEC[variant][0]), OFFICIAL_SPEC[variant][1], \
        _numbers(OFFICIAL_SPEC[variant][2]), _numbers(OFFICIAL_SPEC[variant][3])
    keys: dict[str, list[int]] = {}

    def norm(prefix, channels):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{leaf}"] = [channels]
        keys[f"{prefix}.num_batches_tracked"] = []

    def linear_bn(prefix, cin, cout):
        keys[f"{prefix}.c.weight"] = [cout, cin]
        norm(f"{prefix}.bn", cout)

    def mlp(index, dim):
        linear_bn(f"blocks.{index}.m.0", dim, 2 * dim)
        linear_bn(f"blocks.{index}.m.2", 2 * dim, dim)

    stem = [3, widths[0] // 8, widths[0] // 4, widths[0] // 2, widths[0]]
    for i in range(4):
        keys[f"patch_embed.{2 * i}.c.weight"] = [stem[i + 1], stem[i], 3, 3]
        norm(f"patch_embed.{2 * i}.bn", stem[i + 1])
    side, index = 14, 0
    for stage in range(3):
        dim, nh = widths[stage], heads[stage]
        for _ in range(depths[stage]):
            keys[f"blocks.{index}.m.attention_biases"] = [nh, side * side]
            keys[f"blocks.{index}.m.attention_bias_idxs"] = [side * side, side * side]
            linear_bn(f"blocks.{index}.m.qkv", dim, nh * 4 * key_dim)
            linear_bn(f"blocks.{index}.m.proj.1", nh * 2 * key_dim, dim)
            mlp(index + 1, dim)
            index += 2
        if stage < 2:
            nh, small = dim // key_dim, (side - 1) // 2 + 1
            keys[f"blocks.{index}.attention_biases"] = [nh, side * side]
            keys[f"blocks.{index}.attention_bias_idxs"] = [small * small, side * side]
            linear_bn(f"blocks.{index}.kv", dim, nh * 5 * key_dim)
            linear_bn(f"blocks.{index}.q.1", dim, nh * key_dim)
            linear_bn(f"blocks.{index}.proj.1", nh * 4 * key_dim, widths[stage + 1])
            mlp(index + 1, widths[stage + 1])
            index, side = index + 2, small
    for head in ("head", "head_dist"):
        norm(f"{head}.bn", widths[2])
        keys[f"{head}.l.weight"] = [1000, widths[2]]
        keys[f"{head}.l.bias"] = [1000]
    return keys


@pytest.fixture(scope="module")
def fixture_state() -> dict[str, torch.Tensor]:
    """The official LeViT-128S state_dict filled by the fixtures' rule (head keys included)."""
    keys = load_keys(FIXTURE)
    return official_state(keys["keys"], keys["fixture"]["fill_scale"], integer_keys(keys["keys"]))


def loaded(state, variant="128s", **options) -> LeViT:
    """A LeViT filled from an official state_dict in memory (asserts a complete load)."""
    model = LeViT(variant, **options)
    report = model.load_official_state(state)
    assert report.complete and not report.fresh, report.summary()
    return model


def official_bias_index(side: int, stride: int) -> torch.Tensor:
    """attention_bias_idxs exactly as levit.py enumerates them (offsets numbered by first use)."""
    points = list(itertools.product(range(side), range(side)))
    queries = list(itertools.product(range(0, side, stride), range(0, side, stride)))
    offsets, idxs = {}, []
    for q in queries:
        for k in points:
            offset = (abs(q[0] - k[0]), abs(q[1] - k[1]))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    return torch.tensor(idxs).view(len(queries), len(points))


# --------------------------------------------------------------------------------------------------
# build, names, contract
# --------------------------------------------------------------------------------------------------

def test_variant_config_matches_official_specification():
    assert set(VARIANTS) == set(OFFICIAL_SPEC)
    for key, (widths, key_dim, heads, depths, drop_path) in OFFICIAL_SPEC.items():
        config = VARIANTS[key]
        assert (config.widths, config.key_dim, config.heads, config.depths, config.drop_path) == \
            (_numbers(widths), key_dim, _numbers(heads), _numbers(depths), drop_path)


def test_alias_names_are_the_official_constructors():
    assert ALIASES == {config.official_name: key for key, config in VARIANTS.items()}
    assert set(ALIASES) == {"LeViT_128S", "LeViT_128", "LeViT_192", "LeViT_256", "LeViT_384"}


def test_drop_path_defaults_to_the_official_recipe_on_every_residual_branch():
    """LeViT-384 trains with drop path 0.1, the others with 0 (official specification); the rate
    rises linearly over the residual blocks (shrink blocks included) to reach it at the last block."""
    def rates(model):
        return [m.rate for m in model.modules() if isinstance(m, DropPath)]

    assert set(rates(LeViT("256", layout="official"))) == {0.0}
    official = rates(LeViT("384", layout="official"))
    assert len(official) == 4 + 2 * (1 + 4)  # stage blocks plus one per shrink block
    assert official[0] == 0.0 and official[-1] == pytest.approx(0.1) and official == sorted(official)
    assert rates(LeViT("384", out_strides=(8, 16, 32))) == official[:9]  # the full model's schedule
    assert set(rates(LeViT("384", drop_path_rate=0.0))) == {0.0}


@pytest.mark.parametrize("spelling", ["128S", "128s", "128-S", "LeViT_128S"])
def test_variant_names_are_case_insensitive(spelling):
    if spelling == "LeViT_128S":
        assert build_backbone(spelling).variant == "128s"
    else:
        assert LeViT(spelling).variant == "128s"


def test_layout_errors_name_the_layout_and_its_strides():
    with pytest.raises(ValueError, match=r"layout='detection'.*cannot produce strides \[64\]"):
        LeViT("128s", out_strides=(16, 32, 64))
    with pytest.raises(ValueError, match=r"layout='official'.*cannot produce strides \[8\].*\(16, 32, 64\)"):
        LeViT("128s", out_strides=(8, 16), layout="official")
    with pytest.raises(ValueError, match="unknown layout 'native'"):
        LeViT("128s", layout="native")


def test_stem_convs_and_stages_are_built_up_to_the_deepest_stride():
    assert LeViT("128s", out_strides=(8,)).num_stages == 0
    assert len(LeViT("128s", out_strides=(8,)).stem.convs) == 3
    assert len(LeViT("128s", out_strides=(4,)).stem.convs) == 2
    detection = LeViT("128s", out_strides=(8, 16, 32))
    assert len(detection.stages) == 2 and len(detection.stem.convs) == 4  # no stride-64 stage
    assert detection.stages[0].downsample is None and detection.stages[1].downsample is not None
    official = LeViT("128s", layout="official")
    assert official.out_strides == (16, 32, 64) and official.out_channels == (128, 256, 384)
    assert len(official.stages) == 3


@pytest.mark.parametrize("size", [(640, 512), (320, 256)], ids=["640x512", "320x256"])
def test_bf16_tracks_float32_with_the_fixture_weights(fixture_state, size):
    """With trained-like weights (the fixture's), bf16 stays within bf16 precision of float32 where the
    bias tables are resized to the 40x32 and 20x16 maps of detection inputs."""
    model = loaded(fixture_state, out_strides=(8, 16, 32)).eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        expected = model(x)
        outputs = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16())
    assert all(o.dtype == torch.bfloat16 and relative_diff(o, e) < 0.05 for o, e in zip(outputs, expected))


# --------------------------------------------------------------------------------------------------
# attention biases
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side,stride", [(4, 1), (7, 1), (7, 2), (14, 2)])
def test_bias_at_trained_size_follows_the_official_index_rule(side, stride):
    table = torch.randn(3, side * side)
    ours = relative_position_bias(table, side, (side, side), stride)
    assert torch.equal(ours, table[:, official_bias_index(side, stride)])


@pytest.mark.parametrize("size,stride", [((5, 3), 1), ((9, 6), 2), ((12, 10), 1)])
def test_bias_at_other_sizes_is_the_bicubic_resized_offset_table(size, stride):
    side, (height, width) = 7, size
    table = torch.randn(2, side * side)
    resized = F.interpolate(table.view(1, 2, side, side), size=size, mode="bicubic", align_corners=True)[0]
    bias = relative_position_bias(table, side, size, stride)
    queries = list(itertools.product(range(0, height, stride), range(0, width, stride)))
    keys = list(itertools.product(range(height), range(width)))
    assert bias.shape == (2, len(queries), len(keys))
    expected = torch.stack([torch.stack([resized[:, abs(qy - ky), abs(qx - kx)] for ky, kx in keys], -1)
                            for qy, qx in queries], -2)
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-6)
    # align_corners=True keeps the self-offset (0, 0) and the farthest corner exactly.
    assert torch.equal(resized[:, 0, 0], table[:, 0]) and torch.allclose(resized[:, -1, -1], table[:, -1])


def test_attention_biases_never_go_stale_and_follow_dtype(fixture_state):
    model = loaded(fixture_state, out_strides=(16, 32)).eval()
    x = torch.rand(1, 3, 256, 192)
    with torch.no_grad():
        before = model(x)
        for module in model.modules():  # an EMA-style in-place update while in eval mode
            if isinstance(module, (Attention, AttentionSubsample)):
                module.attention_biases.add_(torch.randn_like(module.attention_biases))
        after = model(x)
        rebuilt = LeViT("128s", out_strides=(16, 32)).eval()
        rebuilt.load_state_dict(model.state_dict())
        expected = rebuilt(x)
    assert all(relative_diff(a, b) > 1e-3 for a, b in zip(after, before))
    assert all(torch.equal(a, e) for a, e in zip(after, expected))
    model.to(torch.float64)
    with torch.no_grad():
        doubled = model(x.double())
    assert all(d.dtype == torch.float64 and relative_diff(d, a) < 1e-5 for d, a in zip(doubled, after))


def test_state_dict_holds_no_index_buffers_and_no_weight_decay_names_the_bias_tables():
    model = LeViT("128s", layout="official")
    assert not [k for k in model.state_dict() if "idxs" in k or k in ("mean", "std")]
    names = model.no_weight_decay()
    parameters = dict(model.named_parameters())
    assert names and names <= set(parameters)
    attention_layers = sum(isinstance(m, (Attention, AttentionSubsample)) for m in model.modules())
    assert len(names) == attention_layers == 2 + 3 + 4 + 2
    assert all(parameters[n].shape[1] in (196, 49, 16) for n in names)


# --------------------------------------------------------------------------------------------------
# official weights
# --------------------------------------------------------------------------------------------------

def test_key_generator_matches_fixture_key_list():
    assert official_key_shapes("128s") == load_keys(FIXTURE)["keys"]


def test_key_conversion_examples():
    module_map = official_module_map("128s")
    assert module_map["patch_embed.6.c"] == "stem.convs.3.conv"
    assert module_map["blocks.2.m"] == "stages.0.blocks.1.attn"
    assert module_map["blocks.3.m.2.bn"] == "stages.0.blocks.1.mlp.fc2.bn"
    assert module_map["blocks.4.q.1.c"] == "stages.1.downsample.attn.q.conv"
    assert module_map["blocks.5.m.0.bn"] == "stages.1.downsample.mlp.fc1.bn"
    assert module_map["blocks.6.m.qkv.c"] == "stages.1.blocks.0.attn.qkv.conv"
    assert module_map["blocks.12"] == "stages.2.downsample.attn"
    assert module_map["blocks.21.m.2.c"] == "stages.2.blocks.3.mlp.fc2.conv"
    detection = LeViT("128s", out_strides=(8, 16, 32))  # stage 3 not built: its keys are split off
    release = {"blocks.12.kv.c.weight": torch.ones(1), "head.l.bias": torch.ones(1)}
    kept, unbuilt = detection.split_unbuilt(
        release, rename=lambda key: key.replace("blocks.12.", "stages.2.downsample.attn."))
    assert unbuilt == ["blocks.12.kv.c.weight"] and list(kept) == ["head.l.bias"]
    release = {"blocks.0.m.qkv.c.weight": torch.ones(256, 128), "head.l.bias": torch.ones(3),
               "blocks.0.m.attention_bias_idxs": torch.zeros(2, dtype=torch.long),
               "bogus.weight": torch.ones(1)}
    ours, ignored = convert_official_state(release, "128s")
    assert ours["stages.0.blocks.0.attn.qkv.conv.weight"].shape == (256, 128, 1, 1)
    assert sorted(ignored) == ["blocks.0.m.attention_bias_idxs", "head.l.bias"] and "bogus.weight" in ours


def test_official_weights_reproduce_official_features(fixture_state, tmp_path):
    keys, features = load_keys(FIXTURE), load_features(FIXTURE)
    path = tmp_path / "LeViT-128S.pth"
    torch.save({keys["checkpoint_top_level_key"]: fixture_state}, path)
    model = LeViT("128S", layout="official", normalize_input=False)
    report = model.load_pretrained(path)
    assert report.complete and not report.fresh, report.summary()
    assert set(keys["head_keys"]) <= set(report.ignored)
    assert set(report.ignored) == set(keys["head_keys"]) | {k for k in keys["keys"] if k.endswith("idxs")}
    model.eval()
    x = torch.from_numpy(features["input"])
    with torch.no_grad():
        outputs = model(x)
        for stride, out in zip(model.out_strides, outputs):
            assert_features_close(out, features[f"feat_{stride}"], rel=1e-5, what=f"feat_{stride}")
        model.reparameterize()
        for stride, out in zip(model.out_strides, model(x)):
            name = f"fused_feat_{stride}"
            assert_features_close(out, features[name], rel=1e-5, what=name)


def test_detection_layout_loads_the_release_and_gives_the_same_stage_features(fixture_state, tmp_path):
    keys, features = load_keys(FIXTURE), load_features(FIXTURE)
    path = tmp_path / "LeViT-128S.pth"
    torch.save({"model": fixture_state}, path)
    model = build_backbone("LeViT", "128S", out_strides=(8, 16, 32), weights=path, normalize_input=False)
    model.eval()
    report = model.load_pretrained(path)
    assert report.complete and not report.fresh and not report.missing
    stage3 = {k for k in keys["keys"] if k.startswith("blocks.") and int(k.split(".")[1]) >= 12}
    assert stage3 <= set(report.ignored)
    with torch.no_grad():
        _, feat16, feat32 = model(torch.from_numpy(features["input"]))
    assert_features_close(feat16, features["feat_16"], rel=1e-5, what="feat_16")
    assert_features_close(feat32, features["feat_32"], rel=1e-5, what="feat_32")


@pytest.mark.parametrize("variant", ["128", "192", "256", "384"])
def test_variants_without_fixture_load_their_official_layout(variant):
    keys = official_key_shapes(variant)
    state = {name: torch.zeros(shape, dtype=torch.long if name in integer_keys(keys) else torch.float32)
             for name, shape in keys.items()}
    for layout, out_strides in (("official", None), ("detection", (8, 16, 32))):
        model = LeViT(variant, out_strides=out_strides, layout=layout)
        report = model.load_official_state(state)
        assert report.complete and not report.fresh and len(report.loaded) == len(model.state_dict())
        assert {k for k in keys if k.startswith("head")} <= set(report.ignored)


# --------------------------------------------------------------------------------------------------
# reparameterisation, gradients with the fixture weights, model YAMLs
# --------------------------------------------------------------------------------------------------

def test_reparameterize_folds_every_batch_norm_of_the_fixture_model(fixture_state):
    model = loaded(fixture_state, out_strides=(8, 16, 32)).eval()
    x = torch.rand(1, 3, 320, 256)
    with torch.no_grad():
        before = model(x)
        model.reparameterize()
        after = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(relative_diff(a, b) <= 1e-4 for a, b in zip(after, before))


YAMLS = {"yolov5-levit.yaml": "128s", "yolov5-levit-256.yaml": "256", "yolov5-levit-384.yaml": "384"}
YAMLS["yolov5-levit-af.yaml"] = YAMLS["yolov5-levit.yaml"]  # the same backbone with the anchor-free head


def test_every_levit_yaml_is_listed_with_its_variant():
    paths = sorted(MODEL_CONFIGS.glob("yolov5-levit*.yaml"))
    assert {p.name for p in paths} == set(YAMLS)
    for path in paths:
        _, _, name, args = yaml_load(path)["backbone"][0]
        assert name == "LeViT" and LeViT.resolve_variant(args[0]) == YAMLS[path.name]


def test_yaml_rows_accept_the_official_name_and_a_weights_mapping(fixture_state, tmp_path):
    from models.yolo import DetectionModel, load_model_config

    path = tmp_path / "LeViT-128S-96703c44.pth"
    torch.save({"model": fixture_state}, path)
    for row_args, name in (([], "LeViT_128S"), ([{"arch": "128S", "weights": str(path)}], "LeViT")):
        cfg = load_model_config("yolov5-levit.yaml")
        cfg["backbone"][0] = [-1, 1, name, row_args]
        backbone = DetectionModel(cfg, nc=2).model[0]
        assert isinstance(backbone, LeViT) and backbone.variant == "128s"
        assert backbone.out_strides == (8, 16, 32) and len(backbone.stages) == 2
    table = backbone.stages[1].blocks[0].attn.attention_biases
    torch.testing.assert_close(table, fixture_state["blocks.6.m.attention_biases"], rtol=0, atol=0)
