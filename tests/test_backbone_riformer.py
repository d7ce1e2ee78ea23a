"""RIFormer backbone: the Backbone contract, official weights (fixtures), re-parameterisation,
gradients, and the detection YAMLs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.backbones import BACKBONES, build_backbone
from models.backbones.riformer import (
    ALIASES,
    VARIANTS,
    RIFormer,
    convert_official_state_dict,
    reparameterize_state_dict,
)
from tests.reference_weights import (
    assert_features_close,
    fill_value,
    load_features,
    load_keys,
    official_state,
)

STEM = "riformer_s12"
PAPER_NAMES = {"s12": "S12", "s24": "S24", "s36": "S36", "m36": "M36", "m48": "M48"}
STRIDES = (4, 8, 16, 32)
SIZES = [(256, 256), (320, 320), (640, 640), (640, 512), (512, 640)]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


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


def save_release(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"meta": {"note": "fixture"}, "state_dict": state}, path)
    return path


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
    return save_release(fixture_release, tmp_path_factory.mktemp("riformer") / "riformer_s12_fixture.pth")


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def randomize_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Weights far from init so folds and layer scales matter (init layer scales are 1e-5)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


# ------------------------------------------------------------------------------------------------
# Building, names, shapes.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_builds_by_paper_name_and_takes_its_official_layout(tmp_path, variant):
    """Build by the paper's name, check the declared outputs against forward, load a state_dict with the
    official keys and shapes of the variant (generated from mmpretrain's layout) with nothing missing."""
    model = build_backbone("RIFormer", PAPER_NAMES[variant])
    cfg = VARIANTS[variant]
    assert isinstance(model, RIFormer) and model.variant == variant
    assert model.out_strides == (4, 8, 16, 32) and model.out_channels == cfg.widths
    assert [len(stage.blocks) for stage in model.stages] == list(cfg.depths)
    scales = {float(b.layer_scale_1[0].detach()) for b in model.blocks()}
    assert len(scales) == 1 and scales.pop() == pytest.approx(cfg.layer_scale_init)
    # One-element storages expanded to the official shapes keep the file small; names and shapes are checked.
    shapes_only = {k: torch.zeros(()).expand(v) for k, v in official_keys(variant).items()}
    report = model.load_pretrained(save_release(shapes_only, tmp_path / f"{variant}.pth"))
    assert report.complete, report.summary()
    assert report.missing == [] and report.mismatched == [] and report.unexpected == []
    assert sorted(report.ignored) == ["head.fc.bias", "head.fc.weight"]
    assert [k.split(".")[1] for k in report.fresh] == ["stride4"] * 2 + ["stride8"] * 2 + ["stride16"] * 2
    with torch.no_grad():
        outs = model.eval()(torch.rand(1, 3, 128, 96))
    assert [tuple(o.shape) for o in outs] == [(1, c, 128 // s, 96 // s) for c, s in zip(cfg.widths, STRIDES)]


def test_aliases_bind_their_variant():
    assert set(ALIASES) == {f"RIFormer_{v.upper()}" for v in VARIANTS} | {f"riformer_{v}" for v in VARIANTS}
    for alias, variant in ALIASES.items():
        entry = BACKBONES.get(alias)
        assert entry.cls is RIFormer and entry.variant == variant
    small = build_backbone("RIFormer_S12", out_strides=(8, 16, 32))
    assert (small.variant, small.out_channels) == ("s12", (128, 320, 512))
    medium = build_backbone("riformer_s24", out_strides=(8,))
    assert (medium.variant, medium.out_channels, len(medium.blocks())) == ("s24", (128,), 8)
    with pytest.raises(ValueError, match="bound to variant"):
        build_backbone("RIFormer_S12", "m48")


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown variant 'x99'.*s12, s24, s36, m36, m48"):
        build_backbone("RIFormer", "x99")
    with pytest.raises(ValueError, match="cannot produce strides"):
        build_backbone("RIFormer", "s12", out_strides=(8, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_backbone("RIFormer", "s12")(torch.rand(1, 1, 64, 64))


def test_only_requested_outputs_and_stages_are_built():
    model = build_backbone("RIFormer", "s12", out_strides=[16, 8])
    assert model.out_strides == (8, 16) and model.out_channels == (128, 320)
    assert len(model.stages) == 3 and set(model.out_norms) == {"stride8", "stride16"}
    outs = model(torch.rand(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 12), (1, 320, 4, 6)]


def check_shapes(model: RIFormer, sizes: list[tuple[int, int]], dtype: torch.dtype) -> None:
    with torch.no_grad():
        for h, w in sizes:
            outs = model(torch.rand(1, 3, h, w, dtype=dtype))
            assert len(outs) == len(model.out_strides)
            for out, s, c in zip(outs, model.out_strides, model.out_channels):
                assert out.shape == (1, c, math.ceil(h / s), math.ceil(w / s)), (h, w, s)
                assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False])
def test_s12_shapes_at_detection_sizes(dtype, train):
    """Square and rectangular inputs, train and eval mode, float32 and bfloat16 (batch 1, no grad)."""
    check_shapes(build_backbone("RIFormer", "s12").to(dtype).train(train), SIZES, dtype)


def test_odd_sizes_are_padded_to_ceil_shapes():
    model = build_backbone("RIFormer", "s12").eval()
    with torch.no_grad():
        outs = model(torch.rand(2, 3, 70, 45))
    assert [tuple(o.shape[2:]) for o in outs] == [(18, 12), (9, 6), (5, 3), (3, 2)]


def test_input_normalisation_is_imagenet_mean_std():
    normalising = build_backbone("RIFormer", "s12", out_strides=(8,)).eval()
    raw = build_backbone("RIFormer", "s12", out_strides=(8,), normalize_input=False).eval()
    raw.load_state_dict(normalising.state_dict())
    assert not any("input_" in k for k in normalising.state_dict())  # buffers are not persistent
    x = torch.rand(1, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normalising(x)[0], raw((x - mean) / std)[0])


def test_dtype_moves_carry_the_normalisation_buffers():
    model = build_backbone("RIFormer", "s12", out_strides=(32,)).eval().to(torch.float64)
    assert model.input_mean.dtype == torch.float64
    with torch.no_grad():
        out64 = model(torch.rand(1, 3, 64, 64, dtype=torch.float64))[0]
    assert out64.dtype == torch.float64 and out64.shape == (1, 512, 2, 2)


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
    report = model.load_pretrained(save_release(deploy, tmp_path / "riformer_s12_deploy.pth"))
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
    path = save_release(release, tmp_path / "riformer_s12_real_layout.pth")
    model = RIFormer("s12", out_strides=(8, 16))
    with caplog.at_level("INFO", logger="vitdet"):
        report = model.load_pretrained(path)
    assert report.complete, report.summary()
    assert report.fresh == ["out_norms.stride8.weight", "out_norms.stride8.bias",
                            "out_norms.stride16.weight", "out_norms.stride16.bias"]
    dropped = [k for k in report.ignored if not k.startswith("head.")]
    assert dropped and all(k.startswith(("stages.3.", "out_norms.stride32.")) for k in dropped)
    assert "strides [8, 16]" in caplog.text and "start fresh" in caplog.text
    assert torch.equal(model.stem.weight, release["backbone.patch_embed.proj.weight"])


def test_bad_release_is_reported_and_the_registry_raises(tmp_path, fixture_release):
    broken = dict(fixture_release)
    broken["backbone.network.8.0.norm1.weight"] = torch.ones(3)  # a fifth stage no variant has
    del broken["backbone.network.2.1.mlp.fc2.bias"]
    broken["backbone.patch_embed.proj.bias"] = torch.zeros(7)
    path = save_release(broken, tmp_path / "broken.pth")
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
# Re-parameterisation, gradients, optimiser hints.
# ------------------------------------------------------------------------------------------------

def test_reparameterize_is_exact_smaller_and_idempotent():
    model = build_backbone("RIFormer", "s12", out_strides=(8, 16, 32)).eval()
    randomize_(model)
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        before = model(x)
        params = sum(p.numel() for p in model.parameters())
        model.reparameterize()
        after = model(x)
        fused_params = sum(p.numel() for p in model.parameters())
        model.reparameterize()
        again = model(x)
    assert fused_params == params - 2 * sum(d * c for d, c in zip((2, 2, 6, 2), (64, 128, 320, 512)))
    assert sum(p.numel() for p in model.parameters()) == fused_params
    for b, a, g in zip(before, after, again):
        assert relative_diff(a, b) <= 1e-4
        assert torch.equal(a, g)


@pytest.mark.parametrize("out_strides", [(8, 16, 32), (4, 8, 16, 32), (4,)])
def test_every_parameter_gets_a_gradient(out_strides):
    model = build_backbone("RIFormer", "s12", out_strides=out_strides).train()
    generator = torch.Generator().manual_seed(1)
    outs = model(torch.rand(1, 3, 64, 64, generator=generator))
    # A random projection: sums or squares of GroupNorm outputs are constant and would give no gradient.
    loss = sum((o * torch.randn(o.shape, generator=generator)).sum() for o in outs)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_reparameterized_model_still_trains():
    model = build_backbone("RIFormer", "s12", out_strides=(32,))
    model.reparameterize()
    outs = model.train()(torch.rand(1, 3, 64, 64))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_no_weight_decay_names_the_layer_scales():
    model = build_backbone("RIFormer", "s12", out_strides=(8, 16, 32))
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert len(names) == 2 * sum(VARIANTS["s12"].depths)
    assert all(n.endswith(("layer_scale_1", "layer_scale_2")) for n in names)


def test_drop_path_rate_is_validated_and_inactive_in_eval():
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_backbone("RIFormer", "s12", drop_path_rate=1.5)
    model = build_backbone("RIFormer", "s12", out_strides=(32,), drop_path_rate=0.5).eval()
    randomize_(model)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        assert torch.equal(model(x)[0], model(x)[0])
        model.train()
        assert not torch.equal(model(x)[0], model(x)[0])  # stochastic depth in training
    # A dropped branch still takes part in the graph (times a zero mask): no parameter is left unused.
    out = model(x)[0]
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Detection YAMLs.
# ------------------------------------------------------------------------------------------------

YAMLS = {"yolov5-riformer.yaml": "s12", "yolov5-riformer-s24.yaml": "s24", "yolov5-riformer-m36.yaml": "m36"}


def test_every_riformer_yaml_is_listed():
    assert {p.name for p in CONFIGS.glob("yolov5-riformer*.yaml")} == set(YAMLS)


@pytest.mark.parametrize("yaml_name", [
    "yolov5-riformer.yaml",
    "yolov5-riformer-s24.yaml",
    pytest.param("yolov5-riformer-m36.yaml", marks=pytest.mark.slow),  # 56M-parameter backbone
])
def test_yaml_builds_runs_and_trains(yaml_name):
    from models.yolo import DetectionModel

    model = DetectionModel(yaml_name)
    backbone = model.model[0]
    assert isinstance(backbone, RIFormer) and backbone.variant == YAMLS[yaml_name]
    assert backbone.out_strides == (8, 16, 32) and len(backbone.stages) == 4
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    x = torch.rand(1, 3, 320, 320)
    maps = model.train()(x)
    assert [tuple(m.shape) for m in maps] == [(1, 3, 40, 40, 85), (1, 3, 20, 20, 85), (1, 3, 10, 10, 85)]
    sum(m.sum() for m in maps).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    with torch.no_grad():
        pred, raw = model.eval()(x)
    assert pred.shape == (1, 3 * (40 * 40 + 20 * 20 + 10 * 10), 85) and torch.isfinite(pred).all()


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
    randomize_(model.model[1:])  # BN statistics away from identity so the Conv+BN fold is exercised
    x = torch.rand(1, 3, 256, 192)
    with torch.no_grad():
        before = model(x)[0]
        params = sum(p.numel() for p in model.parameters())
        model.fuse()
        after = model(x)[0]
    assert backbone.is_reparameterized
    assert sum(p.numel() for p in model.parameters()) < params
    assert relative_diff(after, before) <= 1e-4
