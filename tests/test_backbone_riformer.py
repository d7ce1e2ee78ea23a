"""RIFormer backbone, what is peculiar to it: the mmpretrain release layouts (training-time and
deploy), official features (fixtures), the 4C -> 2C fold, padding of odd sizes, layer scales, YAMLs.
The generic Backbone contract (shapes, dtypes, gradients, reparameterize, errors) is in
tests/test_backbone_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.backbones import build_backbone
from models.backbones.riformer import (
    ALIASES,
    VARIANTS,
    RIFormer,
    convert_official_state_dict,
    reparameterize_state_dict,
)
from tests.backbone_helpers import MODEL_CONFIGS, count_parameters, perturb_, relative_diff, save_release
from tests.reference_weights import (
    assert_features_close,
    fill_value,
    load_features,
    load_keys,
    official_state,
)
from utils.general import yaml_load

STEM = "riformer_s12"
PAPER_NAMES = {"s12": "S12", "s24": "S24", "s36": "S36", "m36": "M36", "m48": "M48"}
STRIDES = (4, 8, 16, 32)


# ------------------------------------------------------------------------------------------------
# Official key lists, written from mmpretrain's RIFormer layout (not from our module).
# ------------------------------------------------------------------------------------------------

def official_keys(variant: str, deploy: bool = False, num_classes: int = 1000) -> dict[str, list[int]]:
    """{name: shape} of an mmpretrain RIFormer classifier checkpoint (`backbone.*` + `head.fc.*`)."""
    cfg = VARIANTS[variant]
    widths = cfg.widths
    keys = {"backbone.patch_embed.proj.weight": [widths[0], 3, 7, 7],
            "backbone.patch_embed.proj.bias": [widths[0]]}
    for i, (depth, c) in enumerate(zip(cfg.depths, widths)):
        for j in range(depth):
            p = f"backbone.network.{2 * i}.{j}."
            keys.update({p + "layer_scale_1": [c], p + "layer_scale_2": [c]})
            if deploy:
                keys.update({p + "norm_reparam.weight": [c], p + "norm_reparam.bias": [c]})
            else:
                keys.update({p + "norm1.weight": [c], p + "norm1.bias": [c],
                             p + "token_mixer.affine.weight": [c, 1, 1, 1],
                             p + "token_mixer.affine.bias": [c]})
            keys.update({p + "norm2.weight": [c], p + "norm2.bias": [c],
                         p + "mlp.fc1.weight": [4 * c, c, 1, 1], p + "mlp.fc1.bias": [4 * c],
                         p + "mlp.fc2.weight": [c, 4 * c, 1, 1], p + "mlp.fc2.bias": [c]})
        if i < 3:
            keys[f"backbone.network.{2 * i + 1}.proj.weight"] = [widths[i + 1], c, 3, 3]
            keys[f"backbone.network.{2 * i + 1}.proj.bias"] = [widths[i + 1]]
    keys.update({"backbone.norm6.weight": [widths[3]], "backbone.norm6.bias": [widths[3]],
                 "head.fc.weight": [num_classes, widths[3]], "head.fc.bias": [num_classes]})
    return keys


def filled_release(keys: dict[str, list[int]], scale: float) -> dict[str, torch.Tensor]:
    """Release layout filled by the fixture rule on the backbone's own names (prefix stripped)."""
    bare = {k.removeprefix("backbone."): v for k, v in keys.items() if not k.startswith("head.")}
    state = {"backbone." + k: v for k, v in official_state(bare, scale).items()}
    state.update({k: fill_value(k, v, scale) for k, v in keys.items() if k.startswith("head.")})
    return state


def fold_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What mmpretrain's switch_to_deploy saves: norm1 + token_mixer -> norm_reparam, official names."""
    out = {}
    for key, value in state.items():
        if key.endswith("norm1.weight"):
            prefix = key[: -len("norm1.weight")]
            w = state[prefix + "token_mixer.affine.weight"].reshape(-1) - 1
            out[prefix + "norm_reparam.weight"] = state[prefix + "norm1.weight"] * w
            shift = state[prefix + "token_mixer.affine.bias"]
            out[prefix + "norm_reparam.bias"] = state[prefix + "norm1.bias"] * w + shift
        elif ".norm1." not in key and ".token_mixer." not in key:
            out[key] = value
    return out


def save_mmpretrain_release(state: dict[str, torch.Tensor], path: Path) -> Path:
    return save_release(state, path, "state_dict", meta={"note": "fixture"})


@pytest.fixture(scope="module")
def fixture_meta() -> dict:
    return load_keys(STEM)


@pytest.fixture(scope="module")
def fixture_arrays() -> dict:
    return load_features(STEM)


@pytest.fixture(scope="module")
def fixture_release(fixture_meta) -> dict[str, torch.Tensor]:
    """The release file as the fixture model held it: checkpoint keys + fixture-only norm0/2/4."""
    keys = dict(fixture_meta["keys"])
    fixture_only = fixture_meta["fixture"]["backbone_keys_not_in_checkpoint"]
    keys.update({"backbone." + k: v for k, v in fixture_only.items()})
    return filled_release(keys, fixture_meta["fixture"]["fill_scale"])


@pytest.fixture(scope="module")
def fixture_release_path(tmp_path_factory, fixture_release) -> Path:
    path = tmp_path_factory.mktemp("riformer") / "riformer_s12_fixture.pth"
    return save_mmpretrain_release(fixture_release, path)


# ------------------------------------------------------------------------------------------------
# Building, names, shapes.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_builds_by_paper_name_and_takes_its_official_layout(tmp_path, variant):
    """Build by the paper's name, load a state_dict with the official keys and shapes of the variant
    (generated from mmpretrain's layout) with nothing missing."""
    model = build_backbone("RIFormer", PAPER_NAMES[variant])
    cfg = VARIANTS[variant]
    assert isinstance(model, RIFormer) and model.variant == variant
    assert model.out_strides == (4, 8, 16, 32) and model.out_channels == cfg.widths
    assert [len(stage.blocks) for stage in model.stages] == list(cfg.depths)
    scales = {float(b.layer_scale_1[0].detach()) for b in model.blocks()}
    assert len(scales) == 1 and scales.pop() == pytest.approx(cfg.layer_scale_init)
    # One-element storages expanded to the official shapes keep the file small; names and shapes are checked.
    shapes_only = {k: torch.zeros(()).expand(v) for k, v in official_keys(variant).items()}
    report = model.load_pretrained(save_mmpretrain_release(shapes_only, tmp_path / f"{variant}.pth"))
    assert report.complete, report.summary()
    assert report.missing == [] and report.mismatched == [] and report.unexpected == []
    assert sorted(report.ignored) == ["head.fc.bias", "head.fc.weight"]
    assert [k.split(".")[1] for k in report.fresh] == ["stride4"] * 2 + ["stride8"] * 2 + ["stride16"] * 2


def test_alias_names_follow_the_paper_and_mmpretrain():
    assert set(ALIASES) == {f"RIFormer_{v.upper()}" for v in VARIANTS} | {f"riformer_{v}" for v in VARIANTS}
    assert all(ALIASES[f"RIFormer_{v.upper()}"] == ALIASES[f"riformer_{v}"] == v for v in VARIANTS)


def test_odd_sizes_are_padded_to_ceil_shapes():
    model = build_backbone("RIFormer", "s12").eval()
    with torch.no_grad():
        outs = model(torch.rand(2, 3, 70, 45))
    assert [tuple(o.shape[2:]) for o in outs] == [(18, 12), (9, 6), (5, 3), (3, 2)]


# ------------------------------------------------------------------------------------------------
# Official weights.
# ------------------------------------------------------------------------------------------------

def test_key_generator_matches_the_fixture_key_lists(fixture_meta):
    assert official_keys("s12") == fixture_meta["keys"]
    assert official_keys("s12", deploy=True) == fixture_meta["deploy_keys_after_switch_to_deploy"]


def test_fixture_weights_give_the_official_features(fixture_meta, fixture_arrays, fixture_release_path):
    model = RIFormer("s12", normalize_input=False)
    report = model.load_pretrained(fixture_release_path)
    assert report.complete, report.summary()
    assert sorted(report.ignored) == sorted(fixture_meta["head_keys"])
    assert report.fresh == [] and report.missing == []
    assert len(report.loaded) == len(model.state_dict())
    model.eval()
    x = torch.from_numpy(fixture_arrays["input"])
    with torch.no_grad():
        for out, stride in zip(model(x), model.out_strides):
            assert_features_close(out, fixture_arrays[f"feat_{stride}"], rel=1e-5, what=f"feat_{stride}")
        count = sum(p.numel() for p in model.parameters())
        model.reparameterize()
        assert sum(p.numel() for p in model.parameters()) < count
        for out, stride in zip(model(x), model.out_strides):
            ref = fixture_arrays[f"fused_feat_{stride}"]
            assert_features_close(out, ref, rel=1e-5, what=f"fused_feat_{stride}")


def test_deploy_release_loads_into_a_fresh_module(tmp_path, fixture_meta, fixture_arrays, fixture_release):
    deploy = fold_official(fixture_release)
    release_keys = set(fixture_meta["deploy_keys_after_switch_to_deploy"])
    assert release_keys <= set(deploy) and {k for k in deploy if k not in release_keys} == {
        f"backbone.norm{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    model = RIFormer("s12", normalize_input=False)
    report = model.load_pretrained(save_mmpretrain_release(deploy, tmp_path / "riformer_s12_deploy.pth"))
    assert report.complete, report.summary()
    assert model.is_reparameterized
    model.eval()
    with torch.no_grad():
        outs = model(torch.from_numpy(fixture_arrays["input"]))
    for out, stride in zip(outs, model.out_strides):
        ref = fixture_arrays[f"fused_feat_{stride}"]
        assert_features_close(out, ref, rel=1e-5, what=f"deploy feat_{stride}")


def test_training_time_release_into_a_reparameterized_module(fixture_arrays, fixture_release_path):
    model = RIFormer("s12", normalize_input=False)
    model.reparameterize()
    report = model.load_pretrained(fixture_release_path)
    assert report.complete, report.summary()
    with torch.no_grad():
        outs = model.eval()(torch.from_numpy(fixture_arrays["input"]))
    assert_features_close(outs[-1], fixture_arrays["fused_feat_32"], rel=1e-5, what="folded on load")


def test_detection_strides_report_fresh_norms_and_ignore_unbuilt_parts(tmp_path, caplog):
    release = filled_release(official_keys("s12"), 0.1)
    path = save_mmpretrain_release(release, tmp_path / "riformer_s12_real_layout.pth")
    model = RIFormer("s12", out_strides=(8, 16))
    with caplog.at_level("INFO", logger="vitdet"):
        report = model.load_pretrained(path)
    assert report.complete, report.summary()
    assert report.fresh == ["out_norms.stride8.weight", "out_norms.stride8.bias",
                            "out_norms.stride16.weight", "out_norms.stride16.bias"]
    dropped = [k for k in report.ignored if not k.startswith("head.")]  # file names, prefix stripped
    assert dropped and all(k.startswith(("network.5.", "network.6.", "norm6.")) for k in dropped)
    assert "strides [8, 16]" in caplog.text and "start fresh" in caplog.text
    assert torch.equal(model.stem.weight, release["backbone.patch_embed.proj.weight"])


def test_bad_release_is_reported_and_the_registry_raises(tmp_path, fixture_release):
    broken = dict(fixture_release)
    broken["backbone.network.8.0.norm1.weight"] = torch.ones(3)  # a fifth stage no variant has
    del broken["backbone.network.2.1.mlp.fc2.bias"]
    broken["backbone.patch_embed.proj.bias"] = torch.zeros(7)
    path = save_mmpretrain_release(broken, tmp_path / "broken.pth")
    report = RIFormer("s12").load_pretrained(path)
    assert report.unexpected == ["stages.4.blocks.0.norm1.weight"]
    assert report.missing == ["stages.1.blocks.1.mlp.fc2.bias"]
    assert report.mismatched == [("stem.bias", (7,), (64,))]
    with pytest.raises(RuntimeError, match="did not load cleanly"):
        build_backbone("RIFormer", "s12", weights=str(path))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("RIFormer", "s12", weights=str(tmp_path / "nowhere.pth"))


def test_conversion_is_a_pure_rename(fixture_release):
    ours, head = convert_official_state_dict(fixture_release)
    assert sorted(head) == ["head.fc.bias", "head.fc.weight"]
    assert ours["stages.2.downsample.weight"] is fixture_release["backbone.network.3.proj.weight"]
    mixer = fixture_release["backbone.network.0.1.token_mixer.affine.weight"]
    assert ours["stages.0.blocks.1.token_mixer.weight"] is mixer
    assert ours["out_norms.stride32.bias"] is fixture_release["backbone.norm6.bias"]
    assert convert_official_state_dict({"odd.key": torch.ones(1)})[0] == {"odd.key": torch.ones(1)}
    fused = reparameterize_state_dict(ours)
    assert not any(".norm1." in k or ".token_mixer." in k for k in fused)


# ------------------------------------------------------------------------------------------------
# Re-parameterisation, optimiser hints.
# ------------------------------------------------------------------------------------------------

def test_reparameterize_folds_norm_and_mixer_into_one_norm_per_block():
    """The paper's fold: norm1 (2C) + affine mixer (2C) -> norm_reparam (2C) in every block."""
    model = perturb_(build_backbone("RIFormer", "s12", out_strides=(8, 16, 32)), scale=0.1).eval()
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        before = model(x)
        params = count_parameters(model)
        model.reparameterize()
        after = model(x)
    removed = sum(2 * width * depth for depth, width in zip((2, 2, 6, 2), (64, 128, 320, 512)))  # 2C/block
    assert count_parameters(model) == params - removed
    assert all(block.is_reparameterized and not hasattr(block, "norm1") for block in model.blocks())
    assert all(relative_diff(a, b) <= 1e-4 for a, b in zip(after, before))


def test_no_weight_decay_names_the_layer_scales():
    model = build_backbone("RIFormer", "s12", out_strides=(8, 16, 32))
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert len(names) == 2 * sum(VARIANTS["s12"].depths)
    assert all(n.endswith(("layer_scale_1", "layer_scale_2")) for n in names)


# ------------------------------------------------------------------------------------------------
# Detection YAMLs.
# ------------------------------------------------------------------------------------------------

YAMLS = {"yolov5-riformer.yaml": "s12", "yolov5-riformer-s24.yaml": "s24", "yolov5-riformer-m36.yaml": "m36"}
YAMLS["yolov5-riformer-af.yaml"] = YAMLS["yolov5-riformer.yaml"]  # the backbone with the anchor-free head


def test_every_riformer_yaml_is_listed_with_its_variant():
    paths = sorted(MODEL_CONFIGS.glob("yolov5-riformer*.yaml"))
    assert {p.name for p in paths} == set(YAMLS)
    for path in paths:
        _, _, name, args = yaml_load(path)["backbone"][0]
        assert name == "RIFormer" and RIFormer.resolve_variant(args[0]) == YAMLS[path.name]


def test_yaml_weights_mapping_and_fuse(tmp_path, fixture_release_path):
    from models.yolo import DetectionModel

    cfg = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25,
           "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
           "backbone": [[-1, 1, "RIFormer", [{"arch": "S12", "weights": str(fixture_release_path)}]],
                        [-1, 1, "SPPF", [1024, 5]]],
           "head": [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
                    [[-1, 3], 1, "Concat", [1]], [-1, 1, "C3", [512, False]],
                    [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
                    [[-1, 2], 1, "Concat", [1]], [-1, 1, "C3", [256, False]],
                    [[12, 8, 5], 1, "Detect", ["nc", "anchors"]]]}
    model = DetectionModel(cfg).eval()
    backbone = model.model[0]
    release = torch.load(fixture_release_path, weights_only=True)["state_dict"]
    assert torch.equal(backbone.out_norms["stride32"].weight, release["backbone.norm6.weight"])
    perturb_(model.model[1:], scale=0.1)  # BN statistics away from identity so the Conv+BN fold is exercised
    x = torch.rand(1, 3, 256, 192)
    with torch.no_grad():
        before = model(x)[0]
        params = sum(p.numel() for p in model.parameters())
        model.fuse()
        after = model(x)[0]
    assert backbone.is_reparameterized
    assert sum(p.numel() for p in model.parameters()) < params
    assert relative_diff(after, before) <= 1e-4
