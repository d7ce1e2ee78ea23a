"""MPViT backbone, what is peculiar to it: paper names, detectron2 channels and official parameter
counts, official weights (fixture features, shared position-encoding aliases), bf16 fold, stale caches,
YAML weights. The generic Backbone contract (shapes, dtypes, gradients, reparameterize, errors) is in
tests/test_backbone_contract.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine.memory import training_step_peak_memory
from models.backbones import build_backbone
from models.backbones.mpvit import (
    ALIASES,
    VARIANTS,
    MPViT,
    MPViTConfig,
    convert_official_state,
    official_key_to_ours,
)
from models.backbones.mpvit_blocks import CRPE_WINDOWS
from tests.backbone_helpers import MODEL_CONFIGS, count_parameters, relative_diff
from tests.reference_weights import assert_features_close, load_features, load_keys, official_state
from utils.general import yaml_load

# Backbone widths at strides 4/8/16/32 as the official detectron2 backbone declares them.
DETECTRON2_CHANNELS = {
    "tiny": (96, 176, 216, 216),
    "xsmall": (128, 192, 256, 256),
    "small": (128, 216, 288, 288),
    "base": (224, 368, 480, 480),
}
# Parameter counts of the official classifiers (docstrings of the official constructors).
OFFICIAL_CLASSIFIER_PARAMS = {"tiny": 5843736, "xsmall": 10573448, "small": 22892400, "base": 74845976}
PAPER_NAMES = {"tiny": ["Tiny", "T", "MPViT-T"], "xsmall": ["XSmall", "XS"], "small": ["Small", "S"],
               "base": ["Base", "B"]}
YAMLS = {"yolov5-mpvit.yaml": "tiny", "yolov5-mpvit-xsmall.yaml": "xsmall",
         "yolov5-mpvit-small.yaml": "small"}
YAMLS["yolov5-mpvit-af.yaml"] = YAMLS["yolov5-mpvit.yaml"]  # the same backbone with the anchor-free head


def official_key_shapes(config: MPViTConfig, num_classes: int = 1000) -> dict[str, list[int]]:
    """Names and shapes of an official MPViT classifier state_dict, written from the official layout.

    Checked against the fixture's key list for Tiny, then used for the variants without a fixture.
    """
    keys: dict[str, list[int]] = {}

    def batch_norm(prefix: str, channels: int) -> None:
        for stat in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{stat}"] = [channels]
        keys[f"{prefix}.num_batches_tracked"] = []

    def crpe(prefix: str, channels: int) -> None:
        for k, (window, heads) in enumerate(CRPE_WINDOWS.items()):
            split = heads * channels // config.num_heads
            keys[f"{prefix}.conv_list.{k}.weight"] = [split, 1, window, window]
            keys[f"{prefix}.conv_list.{k}.bias"] = [split]

    dims = config.embed_dims
    keys["stem.0.conv.weight"] = [dims[0] // 2, 3, 3, 3]
    batch_norm("stem.0.bn", dims[0] // 2)
    keys["stem.1.conv.weight"] = [dims[0], dims[0] // 2, 3, 3]
    batch_norm("stem.1.bn", dims[0])
    for i, width in enumerate(dims):
        for j in range(config.num_paths[i]):
            patch = f"patch_embed_stages.{i}.patch_embeds.{j}.patch_conv"
            keys[f"{patch}.dwconv.weight"] = [width, 1, 3, 3]
            keys[f"{patch}.pwconv.weight"] = [width, width, 1, 1]
            batch_norm(f"{patch}.bn", width)
            encoder = f"mhca_stages.{i}.mhca_blks.{j}"
            layers = [f"{encoder}.MHCA_layers.{n}" for n in range(config.num_blocks[i])]
            for owner in [encoder, *layers]:
                keys[f"{owner}.cpe.proj.weight"] = [width, 1, 3, 3]
                keys[f"{owner}.cpe.proj.bias"] = [width]
                crpe(f"{owner}.crpe", width)
            for layer in layers:
                crpe(f"{layer}.factoratt_crpe.crpe", width)
                hidden = width * config.mlp_ratio
                linears = (("factoratt_crpe.qkv", [3 * width, width]),
                           ("factoratt_crpe.proj", [width, width]),
                           ("mlp.fc1", [hidden, width]),
                           ("mlp.fc2", [width, hidden]))
                for name, shape in linears:
                    keys[f"{layer}.{name}.weight"] = shape
                    keys[f"{layer}.{name}.bias"] = [shape[0]]
                for norm in ("norm1", "norm2"):
                    keys[f"{layer}.{norm}.weight"] = [width]
                    keys[f"{layer}.{norm}.bias"] = [width]
        stage = f"mhca_stages.{i}"
        keys[f"{stage}.InvRes.conv1.conv.weight"] = [width, width, 1, 1]
        batch_norm(f"{stage}.InvRes.conv1.bn", width)
        keys[f"{stage}.InvRes.dwconv.weight"] = [width, 1, 3, 3]
        batch_norm(f"{stage}.InvRes.norm", width)
        keys[f"{stage}.InvRes.conv2.conv.weight"] = [width, width, 1, 1]
        batch_norm(f"{stage}.InvRes.conv2.bn", width)
        out_width = dims[min(i + 1, 3)]
        keys[f"{stage}.aggregate.conv.weight"] = [out_width, width * (config.num_paths[i] + 1), 1, 1]
        batch_norm(f"{stage}.aggregate.bn", out_width)
    keys["cls_head.cls.weight"] = [num_classes, dims[3]]
    keys["cls_head.cls.bias"] = [num_classes]
    return keys


def save_official_release(keys: dict[str, list[int]], path: Path,
                          scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Write a release-layout file ({'model': state_dict}, no prefix) filled by the fixture rule."""
    integer_keys = {k for k in keys if k.endswith("num_batches_tracked")}
    state = official_state(keys, scale, non_float=integer_keys)
    torch.save({"model": state}, path)
    return state


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """MPViT-Tiny filled with the fixture weights through load_pretrained, in eval mode."""
    meta = load_keys("mpvit_tiny")
    path = tmp_path_factory.mktemp("mpvit") / "mpvit_tiny.pth"
    save_official_release(meta["keys"], path, scale=meta["fixture"]["fill_scale"])
    model = MPViT("tiny", normalize_input=False)
    report = model.load_pretrained(path)
    return model.eval(), report, meta, load_features("mpvit_tiny")


# ---------------------------------------------------------------- names, variants, declared outputs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_builds_by_paper_name_with_the_official_channels_and_size(variant):
    for name in PAPER_NAMES[variant]:
        assert build_backbone("MPViT", name).variant == variant
    model = build_backbone("MPViT", PAPER_NAMES[variant][0])
    assert model.out_channels == DETECTRON2_CHANNELS[variant]
    head = VARIANTS[variant].embed_dims[-1] * 1000 + 1000
    assert count_parameters(model) + head == OFFICIAL_CLASSIFIER_PARAMS[variant]


def test_alias_names_are_the_official_constructors():
    assert ALIASES == {**{f"mpvit_{v}": v for v in VARIANTS},
                       **{"MPViT_Tiny": "tiny", "MPViT_XSmall": "xsmall", "MPViT_Small": "small",
                          "MPViT_Base": "base"}}


# ---------------------------------------------------------------- official weights


def test_official_features_match_fixture(tiny_reference):
    model, report, meta, features = tiny_reference
    assert report.complete, report.summary()
    assert not report.missing and not report.unexpected and not report.mismatched and not report.fresh
    assert set(meta["head_keys"]) <= set(report.ignored)
    # Every official name is accounted for: loaded under our name or ignored (head, alias duplicate).
    aliases = {name for group in meta["shared_tensor_alias_groups"] for name in group[:-1]}
    assert set(report.ignored) == aliases | set(meta["head_keys"])
    assert len(report.loaded) + len(report.ignored) == len(meta["keys"])
    with torch.no_grad():
        outputs = model(torch.from_numpy(features["input"]))
    for output, stride in zip(outputs, model.out_strides):
        assert_features_close(output, features[f"feat_{stride}"], rel=1e-5, what=f"feat_{stride}")


def test_shared_position_encodings_take_last_alias(tiny_reference):
    model, _, meta, _ = tiny_reference
    state = model.state_dict()
    official = official_state(meta["keys"], 0.1)
    for group in meta["shared_tensor_alias_groups"]:
        ours = {official_key_to_ours(name) for name in group}
        assert len(ours) == 1, group
        torch.testing.assert_close(state[ours.pop()], official[group[-1]], rtol=0, atol=0)


def test_generated_key_list_equals_fixture_key_list():
    assert official_key_shapes(VARIANTS["tiny"]) == load_keys("mpvit_tiny")["keys"]


@pytest.mark.parametrize("variant", ["xsmall", "small", "base"])
def test_variants_without_fixture_load_official_layout(variant, tmp_path):
    keys = official_key_shapes(VARIANTS[variant])
    path = tmp_path / f"mpvit_{variant}.pth"
    official = save_official_release(keys, path)
    model = MPViT(variant)
    report = model.load_pretrained(path)
    assert report.complete and not report.missing and not report.fresh, report.summary()
    assert {"cls_head.cls.weight", "cls_head.cls.bias"} <= set(report.ignored)
    name = "mhca_stages.2.mhca_blks.1.MHCA_layers.3.factoratt_crpe.qkv.weight"
    torch.testing.assert_close(model.state_dict()[official_key_to_ours(name)], official[name])


def test_truncated_backbone_ignores_deeper_stages(tmp_path):
    path = tmp_path / "mpvit_tiny.pth"
    save_official_release(load_keys("mpvit_tiny")["keys"], path)
    report = MPViT("tiny", out_strides=(4, 8)).load_pretrained(path)
    assert report.complete, report.summary()
    assert "mhca_stages.3.aggregate.conv.weight" in report.ignored


def test_wrong_variant_or_fused_model_is_reported(tmp_path):
    path = tmp_path / "mpvit_tiny.pth"
    save_official_release(load_keys("mpvit_tiny")["keys"], path)
    report = MPViT("xsmall").load_pretrained(path)
    assert not report.complete and report.mismatched
    with pytest.raises(RuntimeError, match="did not load cleanly"):
        build_backbone("MPViT", "xsmall", weights=str(path))
    fused = MPViT("tiny", out_strides=(8,))
    fused.reparameterize()
    with pytest.raises(RuntimeError, match="after reparameterize"):
        fused.load_pretrained(path)
    with pytest.raises(FileNotFoundError, match="not_there.pth"):
        MPViT("tiny").load_pretrained(tmp_path / "not_there.pth")


def test_registry_loads_weights_from_yaml_mapping(tmp_path):
    path = tmp_path / "mpvit_tiny.pth"
    official = save_official_release(load_keys("mpvit_tiny")["keys"], path)
    model = build_backbone("mpvit_tiny", weights=str(path), out_strides=(8, 16, 32))
    torch.testing.assert_close(model.state_dict()["stem.0.conv.weight"], official["stem.0.conv.weight"])


def test_converter_is_pure_and_names_every_rule():
    official = official_state(official_key_shapes(VARIANTS["tiny"]), 0.1)
    converted = convert_official_state(official)
    assert set(converted.state) == set(MPViT("tiny").state_dict())
    source = converted.sources["stages.0.encoders.0.cpe.proj.weight"]
    assert source == "mhca_stages.0.mhca_blks.0.cpe.proj.weight"  # the last of its sorted alias group
    assert official_key_to_ours("something.else") == "something.else"


# ---------------------------------------------------------------- reparameterize


def test_reparameterize_is_exact_with_the_fixture_weights(tiny_reference):
    """MPViT has no paper-level re-parameterisation (the fixture has no fused features): the Conv+BN
    folds must keep the official features."""
    model = copy.deepcopy(tiny_reference[0])
    features = tiny_reference[3]
    model.reparameterize()
    assert model.is_reparameterized and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        outputs = model(torch.from_numpy(features["input"]))
    for output, stride in zip(outputs, model.out_strides):
        assert_features_close(output, features[f"feat_{stride}"], rel=1e-5, what=f"fused feat_{stride}")


def test_reparameterize_keeps_dtype_in_bf16():
    model = MPViT("tiny", out_strides=(8,)).eval().to(torch.bfloat16)
    x = torch.rand(1, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)[0]
        model.reparameterize()
        after = model(x)[0]
    assert after.dtype == torch.bfloat16
    assert relative_diff(after, before) < 5e-2  # bf16 rounding only


# ---------------------------------------------------------------- training


def test_no_weight_decay_names_position_encodings():
    model = MPViT("tiny")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names and names <= set(params)
    assert "stages.2.encoders.1.crpe.convs.2.weight" in names
    assert "stages.0.encoders.0.cpe.proj.weight" in names
    assert not any(".attn." in n or ".mlp." in n for n in names)


def test_no_stale_cache_after_in_place_update_and_dtype_move(tiny_reference):
    # MPViT has no attention-bias tables; its relative position encoding is a conv, computed on every
    # call. An EMA-style in-place update in eval mode must show in the next output.
    model = copy.deepcopy(tiny_reference[0]).eval()
    x = torch.from_numpy(tiny_reference[3]["input"])
    with torch.no_grad():
        before = model(x)[-1]
        model.stages[3].encoders[0].crpe.convs[0].weight.mul_(3.0)
        after = model(x)[-1]
        assert relative_diff(after, before) > 1e-4
        bf16 = model.to(torch.bfloat16)(x.to(torch.bfloat16))[-1]
    assert bf16.dtype == torch.bfloat16
    assert relative_diff(bf16, after) < 5e-2


# ---------------------------------------------------------------- YAML models


def test_every_mpvit_yaml_is_listed_with_its_variant():
    paths = sorted(MODEL_CONFIGS.glob("yolov5-mpvit*.yaml"))
    assert {p.name for p in paths} == set(YAMLS)
    for path in paths:
        _, _, name, args = yaml_load(path)["backbone"][0]
        assert name == "MPViT" and MPViT.resolve_variant(args[0]) == YAMLS[path.name]


def test_yaml_mapping_row_loads_official_weights(tmp_path):
    from models.yolo import DetectionModel

    path = tmp_path / "mpvit_tiny.pth"
    official = save_official_release(load_keys("mpvit_tiny")["keys"], path)
    cfg = yaml_load(MODEL_CONFIGS / "yolov5-mpvit.yaml")
    cfg["backbone"][0] = [-1, 1, "MPViT", [{"arch": "T", "weights": str(path)}]]
    model = DetectionModel(cfg, nc=2)
    backbone = next(m for m in model.modules() if isinstance(m, MPViT))
    assert backbone.variant == "tiny" and backbone.out_strides == (8, 16, 32)
    name = "mhca_stages.3.mhca_blks.2.MHCA_layers.0.mlp.fc2.weight"
    torch.testing.assert_close(backbone.state_dict()[official_key_to_ours(name)], official[name])


# ---------------------------------------------------------------- training memory (engine/memory.py)


@pytest.mark.slow
def test_training_step_peak_memory_grows_with_batch():
    small = training_step_peak_memory("yolov5n.yaml", imgsz=128, batch=1)
    large = training_step_peak_memory("yolov5n.yaml", imgsz=128, batch=8)
    assert 0 < small < large


def test_training_step_peak_memory_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="no_such_model.yaml"):
        training_step_peak_memory("no_such_model.yaml", imgsz=64, batch=1)
    with pytest.raises(TypeError, match="YAML name or path"):
        training_step_peak_memory({"nc": 1}, imgsz=64, batch=1)
    with pytest.raises(ValueError, match="neither cpu nor cuda"):
        training_step_peak_memory("yolov5n.yaml", device="meta")
