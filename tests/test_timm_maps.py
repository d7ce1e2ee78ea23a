"""timm-format state_dicts load into our backbones (models/backbones/timm_maps.py).

Each test builds timm's own model with random weights (no download), saves its state_dict to a file,
loads the file through `load_pretrained` (the path of --backbone-weights and of `weights:` in a YAML)
and compares the features at the strides we return, at 224x224 and at 224x320.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.backbones import build_backbone
from models.backbones.efficientvit_blocks import resize_bias_table
from models.backbones.timm_maps import TIMM_MODELS, is_timm_state, timm_model_name, timm_to_official
from tests.backbone_helpers import one_thread, perturb_, relative_diff  # noqa: F401  (autouse)

timm = pytest.importorskip("timm")

SIZES = ((224, 224), (224, 320))
TOL = 1e-5


def _timm_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb_(timm.create_model(name, pretrained=False, **kwargs), seed=1, scale=0.05).eval()


def _save(model: torch.nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


def _assert_maps_equal(ours: list[torch.Tensor], ref: list[torch.Tensor], what: str) -> None:
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in ref], what
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert relative_diff(a, b) <= TOL, f"{what} map {i}: relative error {relative_diff(a, b):.2e}"


def test_every_mapped_timm_model_exists_in_the_installed_timm():
    known = set(timm.list_models())
    assert {name for name in TIMM_MODELS.values()} <= known
    assert timm_model_name("FastViT", "SA12") == "fastvit_sa12"
    assert timm_model_name("RIFormer", "s12") is None and timm_model_name("MPViT", "tiny") is None


def test_fastvit_t8_timm_file_gives_timm_features(tmp_path):
    reference = _timm_model("fastvit_t8")
    path = _save(reference, tmp_path / "fastvit_t8_timm.pth")
    ours = build_backbone("FastViT", "t8", normalize_input=False, out_norms=False)
    report = ours.load_pretrained(path)
    assert report.complete and not report.fresh, report.summary()
    # the classifier, reported under the release's names
    assert report.ignored and all(k.startswith(("conv_exp.", "head.")) for k in report.ignored)
    ours.eval()
    with torch.no_grad():
        for size in SIZES:
            x = torch.rand(1, 3, *size)
            _assert_maps_equal(ours(x), reference.forward_intermediates(x, intermediates_only=True),
                               f"FastViT-T8 {size}")


def test_fastvit_folded_timm_state_loads_into_the_folded_form(tmp_path):
    from timm.utils.model import reparameterize_model

    reference = reparameterize_model(_timm_model("fastvit_t8"))
    path = _save(reference, tmp_path / "fastvit_t8_timm_fused.pth")
    ours = build_backbone("FastViT", "t8", normalize_input=False, out_norms=False)
    report = ours.load_pretrained(path)
    assert report.complete and ours.is_reparameterized, report.summary()
    ours.eval()
    x = torch.rand(1, 3, *SIZES[1])
    with torch.no_grad():
        _assert_maps_equal(ours(x), reference.forward_intermediates(x, intermediates_only=True), "folded")


def _levit_maps(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm LeViT maps at strides 4, 8 (stem, after Hardswish), 16, 32 (stages 1 and 2)."""
    stem: list[torch.Tensor] = []
    hooks = [getattr(model.stem, name).register_forward_hook(lambda _m, _i, out: stem.append(out))
             for name in ("act2", "act3")]
    try:
        stages = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    return [*stem, *stages]


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s"])
def test_levit_timm_file_gives_timm_features_at_224(name, tmp_path):
    reference = _timm_model(name)
    path = _save(reference, tmp_path / f"{name}.pth")
    ours = build_backbone("LeViT", "128S", normalize_input=False)
    report = ours.load_pretrained(path)
    assert report.complete, report.summary()
    ours.eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        _assert_maps_equal(ours(x), _levit_maps(reference, x), f"{name} 224")


def test_levit_timm_file_at_a_rectangular_size_uses_our_bias_resize(tmp_path):
    """timm's LeViT only runs at the size it was built for; built for 224x320, with its bias tables set
    to the bicubic (align_corners=True) resize of the 224 tables that our forward applies, it must give
    our features for the 224 file at 224x320."""
    trained = _timm_model("levit_128s")
    path = _save(trained, tmp_path / "levit_128s.pth")
    ours = build_backbone("LeViT", "128S", normalize_input=False)
    assert ours.load_pretrained(path).complete
    ours.eval()
    height, width = SIZES[1]
    wide = timm.create_model("levit_128s", pretrained=False, img_size=(height, width)).eval()
    state = trained.state_dict()
    wide_state = wide.state_dict()
    for key, table in state.items():
        if key.endswith("attention_biases"):
            side = int(table.shape[1] ** 0.5)
            target = wide_state[key].shape[1]
            stride = {14: 16, 7: 32, 4: 64}[side]  # key map side at 224 -> its stride
            size = (-(-height // stride), -(-width // stride))
            assert size[0] * size[1] == target, (key, size, target)
            grid = table.reshape(table.shape[0], side, side)[None]
            state[key] = F.interpolate(grid, size=size, mode="bicubic", align_corners=True)[0].flatten(1)
    wide.load_state_dict(state)
    x = torch.rand(1, 3, height, width)
    with torch.no_grad():
        _assert_maps_equal(ours(x), _levit_maps(wide, x), "LeViT-128S 224x320")


def test_efficientvit_m0_timm_file_native_layout_and_table_resize(tmp_path):
    """The 224 timm model has 4x4 stage-3 tables (its stage-3 map is smaller than a window); they are
    resized to our 7x7 windows like the release's, and strides 16 and 32 equal timm's."""
    reference = _timm_model("efficientvit_m0")
    path = _save(reference, tmp_path / "efficientvit_m0.pth")
    ours = build_backbone("EfficientViT", "m0", layout="native", normalize_input=False)
    report = ours.load_pretrained(path)
    assert report.complete, report.summary()
    timm_table = reference.stages[2].blocks[0].mixer.m.attn.attention_biases
    assert timm_table.shape[1] == 16
    ours_table = ours.stages[2].blocks[0].mixer.attention_biases
    torch.testing.assert_close(ours_table, resize_bias_table(timm_table, 7))
    ours.eval()
    with torch.no_grad():
        for size in SIZES:
            x = torch.rand(1, 3, *size)
            _assert_maps_equal(ours(x)[:2], reference.forward_intermediates(x, intermediates_only=True)[:2],
                               f"EfficientViT-M0 native {size}")


def test_efficientvit_m0_timm_file_gives_timm_features_in_the_detection_layout(tmp_path):
    """Our detection layout runs the stem's last conv at stride 1. The same timm model with that conv at
    stride 1, built for 448 pixels (so every stage has full 7x7 windows), gives our strides 8/16/32."""
    reference = _timm_model("efficientvit_m0", img_size=448)
    reference.patch_embed.conv4.conv.stride = (1, 1)
    path = _save(reference, tmp_path / "efficientvit_m0_448.pth")
    ours = build_backbone("EfficientViT", "m0", normalize_input=False)
    assert ours.out_strides == (8, 16, 32)
    assert ours.load_pretrained(path).complete
    ours.eval()
    with torch.no_grad():
        for size in SIZES:
            x = torch.rand(1, 3, *size)
            _assert_maps_equal(ours(x), reference.forward_intermediates(x, intermediates_only=True),
                               f"EfficientViT-M0 detection {size}")


def test_detection_by_key_names_and_untouched_release_files():
    fastvit = timm.create_model("fastvit_t8", pretrained=False).state_dict()
    assert is_timm_state("FastViT", fastvit) and not is_timm_state("LeViT", fastvit)
    official = timm_to_official("FastViT", fastvit, "t8")
    assert not is_timm_state("FastViT", official)  # a release file is never renamed twice
    assert "network.0.0.token_mixer.layer_scale" in official
    assert "patch_embed.0.rbr_conv.0.conv.weight" in official
    with pytest.raises(ValueError, match="not implemented in timm"):
        timm_to_official("RIFormer", fastvit, "s12")


@pytest.mark.parametrize(("timm_name", "family", "variant"), [
    ("fastvit_s12", "FastViT", "t12"),      # same depths and widths, other MLP ratio
    ("levit_128", "LeViT", "128s"),         # same widths, other heads and depths
    ("efficientvit_m1", "EfficientViT", "m0"),
    ("levit_128s", "FastViT", "t8"),        # another family
])
def test_a_file_of_another_variant_or_family_is_refused_naming_tensors(timm_name, family, variant, tmp_path):
    path = _save(timm.create_model(timm_name, pretrained=False), tmp_path / f"{timm_name}.pth")
    ours = build_backbone(family, variant)
    report = ours.load_pretrained(path)
    assert not report.complete
    with pytest.raises(RuntimeError, match=r"MISSING|UNEXPECTED|SHAPE MISMATCH") as error:
        report.raise_if_incomplete()
    first = (report.mismatched[0][0] if report.mismatched else (report.unexpected or report.missing)[0])
    assert first in str(error.value)
