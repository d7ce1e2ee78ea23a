"""FastViT backbone, what is peculiar to it: the apple/ml-fastvit release layouts (training-time and
`_reparam`), official features (fixtures), the stride-32 tap, what the fold keeps, output norms, layer
scales and position encoding, YAML options. The generic Backbone contract (shapes, dtypes, gradients,
reparameterize, errors) is in tests/test_backbone_contract.py."""

from __future__ import annotations

import pytest
import torch

from models.backbones import build_backbone
from models.backbones.fastvit import ALIASES, VARIANTS, FastViT, official_to_ours
from tests.backbone_helpers import MODEL_CONFIGS, relative_diff, save_release
from tests.reference_weights import assert_features_close, load_features, load_keys, official_state
from utils.general import yaml_load

PAPER_NAMES = ("T8", "T12", "S12", "SA12", "SA24", "SA36", "MA36")
FIXTURES = ("fastvit_t8", "fastvit_sa12")
YAMLS = {"yolov5-fastvit.yaml": "sa12", "yolov5-fastvit-t8.yaml": "t8", "yolov5-fastvit-sa24.yaml": "sa24",
         "yolov5-fastvit-ma36.yaml": "ma36"}
YAMLS["yolov5-fastvit-af.yaml"] = YAMLS["yolov5-fastvit.yaml"]  # the same backbone with the anchor-free head


# -- the official checkpoint layout, written from apple/ml-fastvit's classes (independent of our module) --

def _bn(keys: dict, prefix: str, channels: int) -> None:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{leaf}"] = (channels,)
    keys[f"{prefix}.num_batches_tracked"] = ()


def _conv_bn(keys: dict, prefix: str, out_channels: int, in_per_group: int, kernel: int) -> None:
    keys[f"{prefix}.conv.weight"] = (out_channels, in_per_group, kernel, kernel)
    _bn(keys, f"{prefix}.bn", out_channels)


def _mobileone(keys: dict, prefix: str, cin: int, cout: int, kernel: int, groups: int, stride: int = 1,
               conv_branches: int = 1, scale: bool = True, fused: bool = False) -> None:
    if fused:
        keys[f"{prefix}.reparam_conv.weight"] = (cout, cin // groups, kernel, kernel)
        keys[f"{prefix}.reparam_conv.bias"] = (cout,)
        return
    if cin == cout and stride == 1:
        _bn(keys, f"{prefix}.rbr_skip", cin)
    for i in range(conv_branches):
        _conv_bn(keys, f"{prefix}.rbr_conv.{i}", cout, cin // groups, kernel)
    if kernel > 1 and scale:
        _conv_bn(keys, f"{prefix}.rbr_scale", cout, cin // groups, 1)


def _block(keys: dict, prefix: str, dim: int, mlp_ratio: float, attention: bool, fused: bool) -> None:
    if attention:
        keys[f"{prefix}.layer_scale_1"] = keys[f"{prefix}.layer_scale_2"] = (dim, 1, 1)
        _bn(keys, f"{prefix}.norm", dim)
        keys[f"{prefix}.token_mixer.qkv.weight"] = (3 * dim, dim)
        keys[f"{prefix}.token_mixer.proj.weight"] = (dim, dim)
        keys[f"{prefix}.token_mixer.proj.bias"] = (dim,)
    else:
        keys[f"{prefix}.layer_scale"] = (dim, 1, 1)
        if fused:
            _mobileone(keys, f"{prefix}.token_mixer", dim, dim, 3, dim, fused=True)
        else:
            keys[f"{prefix}.token_mixer.layer_scale"] = (dim, 1, 1)
            _mobileone(keys, f"{prefix}.token_mixer.norm", dim, dim, 3, dim, conv_branches=0, scale=False)
            _mobileone(keys, f"{prefix}.token_mixer.mixer", dim, dim, 3, dim)
    hidden = int(dim * mlp_ratio)
    _conv_bn(keys, f"{prefix}.convffn.conv", dim, 1, 7)
    keys.update({f"{prefix}.convffn.fc1.weight": (hidden, dim, 1, 1), f"{prefix}.convffn.fc1.bias": (hidden,),
                 f"{prefix}.convffn.fc2.weight": (dim, hidden, 1, 1), f"{prefix}.convffn.fc2.bias": (dim,)})


def _classifier(keys: dict, dim: int, fused: bool) -> None:
    expanded = 2 * dim
    squeezed = int(expanded * 0.0625)
    keys.update({"conv_exp.se.reduce.weight": (squeezed, expanded, 1, 1),
                 "conv_exp.se.reduce.bias": (squeezed,),
                 "conv_exp.se.expand.weight": (expanded, squeezed, 1, 1),
                 "conv_exp.se.expand.bias": (expanded,)})
    _mobileone(keys, "conv_exp", dim, expanded, 3, dim, fused=fused)
    keys.update({"head.weight": (1000, expanded), "head.bias": (1000,)})


def official_keys(variant: str, fused: bool = False) -> dict[str, tuple]:
    """{name: shape} of the official classification checkpoint (`fastvit_<v>.pth.tar` or `_reparam`)."""
    config = VARIANTS[variant]
    widths, keys = config.widths, {}
    _mobileone(keys, "patch_embed.0", 3, widths[0], 3, 1, stride=2, fused=fused)
    _mobileone(keys, "patch_embed.1", widths[0], widths[0], 3, widths[0], stride=2, fused=fused)
    _mobileone(keys, "patch_embed.2", widths[0], widths[0], 1, 1, fused=fused)
    index = 0
    for stage, (depth, dim) in enumerate(zip(config.depths, widths)):
        attention = config.attention_last and stage == 3
        if stage > 0:
            if fused:
                keys[f"network.{index}.proj.0.lkb_reparam.weight"] = (dim, 1, 7, 7)
                keys[f"network.{index}.proj.0.lkb_reparam.bias"] = (dim,)
            else:
                _conv_bn(keys, f"network.{index}.proj.0.lkb_origin", dim, 1, 7)
                _conv_bn(keys, f"network.{index}.proj.0.small_conv", dim, 1, 3)
            _mobileone(keys, f"network.{index}.proj.1", dim, dim, 1, 1, fused=fused)
            index += 1
        if attention:
            conv = "reparam_conv" if fused else "pe"
            keys[f"network.{index}.{conv}.weight"] = (dim, 1, 7, 7)
            keys[f"network.{index}.{conv}.bias"] = (dim,)
            index += 1
        for block in range(depth):
            _block(keys, f"network.{index}.{block}", dim, config.mlp_ratio, attention, fused)
        index += 1
    _classifier(keys, widths[-1], fused)
    return keys


def save_apple_release(state: dict, path) -> str:
    """Write a state_dict in the release layout {'state_dict': ...}; returns the path as str."""
    return str(save_release(state, path, "state_dict"))


def rule_filled(keys: dict) -> dict[str, torch.Tensor]:
    """The fixture fill rule over an official {name: shape} mapping (int64 zeros for num_batches_tracked)."""
    return official_state(keys, 0.1, non_float={k for k in keys if k.endswith("num_batches_tracked")})


def randomise_for_folding(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and layer scales ~0.5, so that a wrong fold shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
            elif name.endswith("running_mean") or name.endswith(".bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=g))
            elif "layer_scale" in name:
                tensor.copy_(0.25 + 0.5 * torch.rand(tensor.shape, generator=g))


# -- names, variants and declared outputs ---------------------------------------------------------------

def constant_filled(keys: dict) -> dict[str, torch.Tensor]:
    """Official {name: shape} -> tensors backed by one element each, so a 44M-parameter release saves as a
    few kB (torch.save keeps the expanded view's one-element storage)."""
    state = {}
    for i, (name, shape) in enumerate(sorted(keys.items())):
        dtype = torch.int64 if name.endswith("num_batches_tracked") else torch.float32
        state[name] = torch.full((1,), 1 + i % 7, dtype=dtype).reshape((1,) * len(shape)).expand(shape)
    return state


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_every_variant_builds_by_paper_name_and_loads_the_official_layouts(name, tmp_path):
    """The official training-time and _reparam key lists (generated from the official classes) load
    with nothing missing, unexpected or mismatched, the head ignored, the values where the renaming says."""
    model = build_backbone("FastViT", name)
    variant = name.lower()
    assert model.variant == variant and model.out_channels == VARIANTS[variant].widths

    release = constant_filled(official_keys(variant))
    report = model.load_pretrained(save_apple_release(release, tmp_path / "train.pth"))
    assert report.complete and not report.missing, report.summary()
    assert sorted(report.ignored) == sorted(k for k in release if k.startswith(("head.", "conv_exp.")))
    assert sorted(report.fresh) == sorted(k for k in model.state_dict()
                                          if k.startswith("norms.") and not k.endswith("num_batches_tracked"))
    last = max(int(k.split(".")[1]) for k in release if k.startswith("network."))
    ours = model.state_dict()
    assert torch.equal(ours["stages.3.blocks.1.ffn.fc2.bias"], release[f"network.{last}.1.convffn.fc2.bias"])
    assert torch.equal(ours["stem.1.scale_branch.bn.running_var"],
                       release["patch_embed.1.rbr_scale.bn.running_var"])

    fused_release = constant_filled(official_keys(variant, fused=True))
    report = model.load_pretrained(save_apple_release(fused_release, tmp_path / "reparam.pth"))
    assert model.is_reparameterized  # a _reparam release folds the module first
    assert report.complete and not report.missing, report.summary()
    assert len(report.loaded) == len([k for k in fused_release if not k.startswith(("head.", "conv_exp."))])


def test_alias_names_are_the_official_constructors():
    assert ALIASES == {f"fastvit_{v}": v for v in VARIANTS} | {f"FastViT_{v.upper()}": v for v in VARIANTS}
    with pytest.raises(ValueError, match="unknown variant"):
        official_to_ours(["patch_embed.0.rbr_conv.0.conv.weight"], "xl")


def test_output_norms_are_built_for_the_requested_strides_or_not_at_all():
    assert set(FastViT("sa12", out_strides=(4, 8)).norms) == {"stride4", "stride8"}
    assert FastViT("t8", out_norms=False).norms is None


def test_dtype_moves_give_the_same_features():
    torch.manual_seed(0)
    model = build_backbone("FastViT", "T8").eval()
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        reference = model(x)
        doubled = model.double()(x.double())
    for ours, ref in zip(doubled, reference):
        assert ours.dtype == torch.float64 and relative_diff(ours, ref) < 1e-5


# -- official weights: the fixtures ------------------------------------------------------------------------

@pytest.mark.parametrize("stem", FIXTURES)
def test_official_key_generator_matches_the_fixture_key_lists(stem):
    """The official layout used for the variants without fixtures reproduces the fixtures' key lists."""
    keys = load_keys(stem)
    variant = keys["variant"].lower()
    assert official_keys(variant) == {k: tuple(v) for k, v in keys["keys"].items()}
    fused = keys["reparam_release"]["keys"]
    assert official_keys(variant, fused=True) == {k: tuple(v) for k, v in fused.items()}
    assert keys["checkpoint_top_level_key"] == "state_dict" and keys["prefix"] == ""


@pytest.mark.parametrize("stem", FIXTURES)
def test_official_weights_give_the_official_features(stem, tmp_path):
    """Release layout filled by the rule -> load_pretrained -> raw taps equal feat_*; reparameterised
    -> fused_feat_*; the `_reparam` release built from the fused weights loads into a fresh module."""
    keys, refs = load_keys(stem), load_features(stem)
    variant = keys["variant"].lower()
    model = FastViT(variant, normalize_input=False, out_norms=False)
    path = save_apple_release(rule_filled(keys["keys"]), tmp_path / f"{stem}.pth.tar")
    report = model.load_pretrained(path)
    assert report.complete and not report.missing and not report.fresh, report.summary()
    assert sorted(report.ignored) == sorted(keys["head_keys"])
    model.eval()
    x = torch.from_numpy(refs["input"])
    with torch.no_grad():
        for stride, feature in zip(model.out_strides, model(x)):
            assert_features_close(feature, refs[f"feat_{stride}"], rel=1e-5, what=f"{stem} feat_{stride}")

    model.reparameterize()
    with torch.no_grad():
        for stride, feature in zip(model.out_strides, model(x)):
            assert_features_close(feature, refs[f"fused_feat_{stride}"], rel=1e-5,
                                  what=f"{stem} fused {stride}")

    # the _reparam release: every official key has a home in the folded module, shapes agree
    fused_keys = keys["reparam_release"]["keys"]
    names = official_to_ours(fused_keys, variant)
    ours = model.state_dict()
    backbone = {k: n for k, n in names.items() if n is not None}
    assert set(backbone.values()) == set(ours)
    release = {k: ours[n].reshape(fused_keys[k]) for k, n in backbone.items()}
    release |= {k: torch.zeros(fused_keys[k]) for k in keys["reparam_release"]["head_keys"]}
    fresh = FastViT(variant, normalize_input=False, out_norms=False)
    report = fresh.load_pretrained(save_apple_release(release, tmp_path / f"{stem}_reparam.pth.tar"))
    assert report.complete and not report.missing, report.summary()
    with torch.no_grad():
        for stride, feature in zip(fresh.eval().out_strides, fresh(x)):
            assert_features_close(feature, refs[f"fused_feat_{stride}"], rel=1e-5,
                                  what=f"{stem} release {stride}")


def test_sa12_stride32_is_after_attention_not_the_position_encoding(tmp_path):
    """The official multi-output mode returns the RepCPE map (cpe_32) at stride 32; ours is the map after
    the attention stage."""
    keys, refs = load_keys("fastvit_sa12"), load_features("fastvit_sa12")
    model = FastViT("sa12", out_strides=(32,), normalize_input=False, out_norms=False)
    model.load_pretrained(save_apple_release(rule_filled(keys["keys"]), tmp_path / "sa12.pth.tar"))
    taps = []
    model.stages[3].pos_enc.register_forward_hook(lambda module, args, out: taps.append(out))
    with torch.no_grad():
        (stride32,) = model.eval()(torch.from_numpy(refs["input"]))
    assert_features_close(taps[0], refs["cpe_32"], rel=1e-5, what="cpe_32")
    assert_features_close(stride32, refs["feat_32"], rel=1e-5, what="feat_32")
    assert relative_diff(stride32, torch.from_numpy(refs["cpe_32"])) > 0.1


def test_load_errors_and_partial_builds(tmp_path):
    keys = load_keys("fastvit_t8")
    path = save_apple_release(rule_filled(keys["keys"]), tmp_path / "t8.pth.tar")
    shallow = FastViT("t8", out_strides=(4, 8), out_norms=False)
    report = shallow.load_pretrained(path)  # deeper stages are ignored, not unexpected
    assert report.complete and not report.missing
    assert any(k.startswith("network.4.") for k in report.ignored)

    folded = FastViT("t8")
    folded.reparameterize()
    with pytest.raises(ValueError, match="cannot load into a module that was already reparameterised"):
        folded.load_pretrained(path)

    broken = rule_filled(keys["keys"]) | {"network.9.0.layer_scale": torch.zeros(1)}
    broken["network.0.0.layer_scale"] = torch.zeros(7)
    with pytest.raises(RuntimeError, match=r"UNEXPECTED 1: network.9.0.layer_scale.*SHAPE MISMATCH 1"):
        build_backbone("FastViT", "t8", weights=save_apple_release(broken, tmp_path / "broken.pth"))

    # a detection-framework file: `backbone.` prefix and the official dense-prediction norms norm0/2/4/6
    fork_norms = {f"norm{i}.{leaf}": torch.full((channels,), 0.5 + i)
                  for i, channels in zip((0, 2, 4, 6), (48, 96, 192, 384))
                  for leaf in ("weight", "bias", "running_mean", "running_var")}
    mmdet_style = {f"backbone.{k}": v for k, v in (rule_filled(keys["keys"]) | fork_norms).items()}
    torch.save({"state_dict": mmdet_style}, tmp_path / "prefixed.pth")
    model = build_backbone("FastViT", "t8", weights=str(tmp_path / "prefixed.pth"))
    assert torch.equal(model.norms.stride4.weight, fork_norms["norm0.weight"])
    assert torch.equal(model.norms.stride32.running_var, fork_norms["norm6.running_var"])
    report = FastViT("sa12", out_norms=False).load_pretrained(
        save_apple_release(rule_filled(load_keys("fastvit_sa12")["keys"]) | {"norm6.weight": torch.ones(512)},
                     tmp_path / "sa12_norm6.pth"))
    assert report.complete and "norm6.weight" in report.ignored  # SA norm6 sits before attention: no home


# -- reparameterisation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["t8", "sa12"])
def test_reparameterize_folds_the_branches_and_keeps_the_ffn_norms(variant):
    """The paper's inference form: branches folded into single convs, the ConvFFN depthwise BN and the
    attention stage as they are (the layout of the official `_reparam` releases)."""
    torch.manual_seed(0)
    model = FastViT(variant)
    randomise_for_folding(model)
    model.eval()
    x = torch.rand(1, 3, 160, 128)
    with torch.no_grad():
        before = model(x)
        model.reparameterize()
        after = model(x)
    assert all(relative_diff(a, b) < 1e-4 for a, b in zip(after, before))
    keys = model.state_dict()
    assert not any(k.split(".")[-2] in ("mixer", "rbr_conv", "conv_branches", "large", "small") for k in keys)
    assert "stages.0.blocks.0.ffn.depthwise.bn.running_var" in keys


# -- no stale state ------------------------------------------------------------------------------------------

def test_in_place_weight_updates_in_eval_take_effect():
    """No cached tables: an EMA-style in-place update in eval mode changes the next output."""
    model = FastViT("sa12", out_strides=(32,)).eval()
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        before = model(x)[0]
        model.stages[3].blocks[0].layer_scale_attn.fill_(0.5)
        model.stages[3].blocks[0].token_mixer.qkv.weight.mul_(3.0)
        after_attention = model(x)[0]
        model.stages[3].pos_enc.conv.weight.add_(0.5)
        after_cpe = model(x)[0]
    assert relative_diff(after_attention, before) > 1e-3
    assert relative_diff(after_cpe, after_attention) > 1e-3


def test_no_weight_decay_names_layer_scales_and_position_encoding():
    model = FastViT("sa12")
    names = model.no_weight_decay()
    parameters = dict(model.named_parameters())
    assert names <= parameters.keys()
    layer_scales = {n for n in parameters if n.rsplit(".", 1)[-1].startswith("layer_scale")}
    assert len(layer_scales) == 2 * (2 + 2 + 6) + 2 * 2  # RepMixer blocks (block + mixer), attention blocks
    assert names == layer_scales | {"stages.3.pos_enc.conv.weight", "stages.3.pos_enc.conv.bias"}
    model.reparameterize()
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    assert "stages.3.pos_enc.fused_conv.weight" in model.no_weight_decay()


# -- detection YAMLs ---------------------------------------------------------------------------------------

def test_every_fastvit_yaml_is_listed_with_its_variant():
    paths = sorted(MODEL_CONFIGS.glob("yolov5-fastvit*.yaml"))
    assert {p.name for p in paths} == set(YAMLS)
    for path in paths:
        _, _, name, args = yaml_load(path)["backbone"][0]
        assert name == "FastViT" and FastViT.resolve_variant(args[0]) == YAMLS[path.name]


def test_yaml_row_with_alias_and_mapping_options():
    from models.yolo import DetectionModel, load_model_config

    cfg = load_model_config("yolov5-fastvit-t8.yaml")
    cfg["backbone"][0] = [-1, 1, "FastViT", [{"arch": "T8", "out_norms": False}]]
    assert DetectionModel(cfg).model[0].norms is None
    cfg["backbone"][0] = [-1, 1, "fastvit_t8", []]
    assert DetectionModel(cfg).model[0].variant == "t8"
