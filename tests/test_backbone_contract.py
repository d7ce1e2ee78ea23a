"""The Backbone contract (docs/design.md, "The Backbone contract") for every registered family and
variant, and for the test-only toy family of tests/toy_backbones.py.

The cases come from the registry: a family added to models/backbones/__init__.py is tested here with
no new test. The toy families are registered for this module only; they show that a family written
on the template passes the whole contract. Per case: build by name, declared vs real outputs (square
and rectangular inputs, train and eval, float32 and bfloat16), a gradient for every parameter, exact
and idempotent `reparameterize()`. Per family: error messages, aliases, single-stride builds (what is
built, which checkpoint keys are unbuilt), input normalisation, detection-size inputs. Per model YAML
of the family (a generated one when configs/models/ has none): build, one training step, fuse.

The first variant of each family (by convention its smallest) runs in the quick suite; the other
variants and the shipped YAMLs' training steps are marked slow (they still run in CI).
"""

from __future__ import annotations

import copy
import math
import re
from contextlib import ExitStack

import pytest
import torch

from models.backbones import BACKBONES, Backbone, build_backbone
from models.backbones.layers import DropPath
from models.yolo import DetectionModel
from tests.backbone_helpers import (
    MODEL_CONFIGS,
    count_parameters,
    detection_yaml,
    one_thread,  # noqa: F401  (autouse: one intra-op thread for this module)
    parameters_without_gradient,
    perturb_,
    random_projection,
    registered_families,
    relative_diff,
    training_loss,
    yaml_backbone_family,
)
from tests.toy_backbones import TOY_FAMILIES

FAMILIES: dict[str, type[Backbone]] = {
    **registered_families(), **{cls.family: cls for cls in TOY_FAMILIES if cls.family not in BACKBONES}}
SLOW = pytest.mark.slow
SIZES = {"square": (128, 128), "rectangular": (160, 96)}  # multiples of 32; 160x96 gives odd deep maps
DETECTION_SIZES = [(256, 256), (320, 256), pytest.param((640, 512), marks=SLOW)]


def _variant_cases() -> list:
    return [pytest.param((family, variant), id=f"{family}-{variant}", marks=() if i == 0 else SLOW)
            for family, cls in FAMILIES.items() for i, variant in enumerate(cls.variants)]


def _yaml_cases() -> list:
    """Every shipped model YAML of each family (slow), or a generated one for a family without any."""
    shipped = {path: yaml_backbone_family(path) for path in sorted(MODEL_CONFIGS.glob("*.yaml"))}
    cases = []
    for family, cls in FAMILIES.items():
        paths = [path for path, owner in shipped.items() if owner == family]
        cases += [pytest.param((family, str(path)), id=path.name, marks=SLOW) for path in paths]
        if not paths:
            variant = next(iter(cls.variants))
            generated = detection_yaml(family, variant)
            cases.append(pytest.param((family, generated), id=f"{family}-{variant}-generated"))
    return cases


@pytest.fixture(scope="module", autouse=True)
def toys_registered():
    """The toy families are in the registry (hence buildable by name and in YAMLs) for this module only."""
    with ExitStack() as stack:
        for cls in TOY_FAMILIES:
            if cls.family not in BACKBONES:
                stack.enter_context(BACKBONES.temporarily(cls.family, cls))
        yield


@pytest.fixture(scope="module", params=_variant_cases())
def case(request) -> tuple[str, str]:
    return request.param


@pytest.fixture(scope="module")
def built(case) -> Backbone:
    """The case's backbone, built once by name at seed 0; a test that changes it works on a copy."""
    torch.manual_seed(0)
    return build_backbone(*case)


@pytest.fixture(scope="module", params=[pytest.param(name, id=name) for name in FAMILIES])
def family(request) -> str:
    return request.param


def first_variant(family: str) -> str:
    return next(iter(FAMILIES[family].variants))


def expected_shapes(model: Backbone, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    return [(batch, c, math.ceil(height / s), math.ceil(width / s))
            for c, s in zip(model.out_channels, model.out_strides)]


def assert_declared_modules_make_the_maps(model: Backbone, height: int = 64, width: int = 96) -> None:
    """Each requested feature's `module` (and `output_module`) exists and outputs a map of the declared
    stride and channels: a misspelt declaration would break the unbuilt-key filtering silently."""
    modules = dict(model.named_modules())
    named = [(f, name) for f in model.out_features for name in (f.module, f.output_module) if name]
    missing = [name for _, name in named if name not in modules]
    assert not missing, f"declared modules not found in {model.display_name}: {missing}"
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, args, output) -> None:  # returning None keeps the module's output
            shapes.setdefault(name, tuple(output.shape[1:]))
        return hook

    hooks = [modules[name].register_forward_hook(record(name)) for _, name in named]
    try:
        with torch.no_grad():
            model.eval()(torch.rand(1, 3, height, width))
    finally:
        for hook in hooks:
            hook.remove()
    for feature, name in named:
        expected = (feature.channels, math.ceil(height / feature.stride), math.ceil(width / feature.stride))
        assert shapes[name] == expected, (name, feature)


def without_drop_path(model: Backbone) -> Backbone:
    """Stochastic depth off, so that a branch dropped for the whole batch cannot zero a gradient."""
    for module in model.modules():
        if isinstance(module, DropPath):
            module.rate = 0.0
    return model


# -- the parametrisation itself ----------------------------------------------------------------

def test_cases_cover_every_registered_family_and_the_toys():
    assert set(FAMILIES) == set(registered_families()) | {cls.family for cls in TOY_FAMILIES}
    ids = {param.id for param in _variant_cases()}
    assert ids == {f"{name}-{variant}" for name, cls in FAMILIES.items() for variant in cls.variants}


# -- per variant ---------------------------------------------------------------------------------

def test_builds_by_name_with_its_declared_features(case, built):
    family, variant = case
    assert type(built) is FAMILIES[family] and built.variant == FAMILIES[family].resolve_variant(variant)
    declared = built.feature_info
    strides = [feature.stride for feature in declared]
    assert strides == sorted(set(strides)) and all(s & (s - 1) == 0 for s in strides)
    assert built.out_strides == tuple(strides) == built.supported_strides
    assert built.out_channels == tuple(feature.channels for feature in declared)
    assert built.output_shape() == {feature.stride: feature.channels for feature in declared}
    assert_declared_modules_make_the_maps(built)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 1, 64, 64\)"):
        built(torch.rand(1, 1, 64, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_real_outputs_are_the_declared_ones(built, mode, dtype):
    model = copy.deepcopy(built).to(dtype).train(mode == "train")
    for height, width in SIZES.values():
        x = torch.rand(2, 3, height, width)
        with torch.no_grad():
            outputs = model(x.to(dtype))
        assert [tuple(o.shape) for o in outputs] == expected_shapes(model, 2, height, width), (height, width)
        assert all(o.dtype == dtype and torch.isfinite(o).all() for o in outputs)
        if dtype == torch.bfloat16 and mode == "eval":  # bf16 tracks float32 to its own precision
            with torch.no_grad():
                reference = built.eval()(x)
            assert all(relative_diff(o, r) < 0.05 for o, r in zip(outputs, reference))


def test_every_parameter_gets_a_gradient(built):
    model = without_drop_path(perturb_(copy.deepcopy(built))).train()
    random_projection(model(torch.rand(2, 3, 96, 64))).backward()
    assert parameters_without_gradient(model, nonzero=True) == []


def test_stochastic_depth_keeps_every_parameter_in_the_graph(built):
    model = copy.deepcopy(built)
    drop_paths = [module for module in model.modules() if isinstance(module, DropPath)]
    if not drop_paths:
        pytest.skip(f"{built.display_name} has no stochastic depth")
    for module in drop_paths:
        module.rate = 0.5
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        model.eval()
        assert all(torch.equal(a, b) for a, b in zip(model(x), model(x)))  # no randomness in eval
    torch.manual_seed(0)
    random_projection(model.train()(x)).backward()
    assert parameters_without_gradient(model) == []  # a dropped branch is multiplied by 0, not skipped


def test_reparameterize_is_exact_smaller_and_idempotent(built):
    model = perturb_(copy.deepcopy(built)).eval()
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        before = model(x)
        params = count_parameters(model)
        assert not model.is_reparameterized
        model.reparameterize()
        assert model.is_reparameterized
        after = model(x)
        folded = {key: value.clone() for key, value in model.state_dict().items()}
        model.reparameterize()
        again = model(x)
    assert count_parameters(model) <= params
    assert list(model.state_dict()) == list(folded)
    assert all(torch.equal(value, folded[key]) for key, value in model.state_dict().items())
    for b, a, g in zip(before, after, again):
        assert relative_diff(a, b) <= 1e-4 and torch.equal(a, g)
    random_projection(model.train()(x)).backward()  # the folded form still trains
    assert parameters_without_gradient(model) == []


# -- per family ----------------------------------------------------------------------------------

def test_unknown_variant_and_stride_errors_name_the_known_ones(family):
    cls = FAMILIES[family]  # an open-ended family (Timm: any timm name) describes its variants itself
    known = cls.variants_description() if hasattr(cls, "variants_description") else ", ".join(cls.variants)
    with pytest.raises(ValueError, match=rf"unknown variant 'no_such_net'; known: {re.escape(known)}$"):
        build_backbone(family, "no_such_net")
    with pytest.raises(ValueError, match=r"cannot produce strides \[3\].*it produces \("):
        build_backbone(family, first_variant(family), out_strides=(3,))


def test_aliases_bind_variants_of_their_family(family):
    cls = FAMILIES[family]
    aliases = [name for name in BACKBONES.names()
               if BACKBONES.get(name).cls is cls and BACKBONES.get(name).variant is not None]
    for alias in aliases:
        bound = BACKBONES.get(alias).variant
        assert bound in cls.variants
        other = next((v for v in cls.variants if v != bound), None)
        if other is not None:
            with pytest.raises(ValueError, match=f"{alias} is bound to variant '{bound}'"):
                BACKBONES.build(alias, other)


def test_a_single_stride_builds_only_what_it_needs(family):
    """Each declared map alone: nothing deeper is built, the full model's checkpoint keys split into
    exactly this build's keys and the unbuilt rest, and every built parameter gets a gradient."""
    torch.manual_seed(0)
    full = build_backbone(family, first_variant(family))
    full_state = full.state_dict()
    for index, feature in enumerate(full.feature_info):
        part = build_backbone(family, first_variant(family), out_strides=(feature.stride,))
        assert (part.out_strides, part.out_channels) == ((feature.stride,), (feature.channels,))
        present = dict(part.named_modules())
        deeper = [f.module for f in full.feature_info[index + 1:] if f.module != feature.module]
        others = [f.output_module for f in full.feature_info if f is not feature and f.output_module]
        assert not [name for name in deeper + others if name in present], feature
        kept, dropped = part.split_unbuilt(full_state)
        part.load_state_dict(kept, strict=True)
        assert len(kept) + len(dropped) == len(full_state)
        random_projection(without_drop_path(part).train()(torch.rand(2, 3, 96, 64))).backward()
        assert parameters_without_gradient(part) == [], feature


def test_input_normalisation_uses_the_declared_statistics(family):
    torch.manual_seed(0)
    normalising = build_backbone(family, first_variant(family), normalize_input=True).eval()
    raw = build_backbone(family, first_variant(family), normalize_input=False).eval()
    raw.load_state_dict(normalising.state_dict())
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in normalising.input_statistics)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        for ours, reference in zip(normalising(x), raw((x - mean) / std)):
            torch.testing.assert_close(ours, reference)
    assert not any(key.startswith("input_") for key in normalising.state_dict())  # not persistent
    normalising.to(torch.float64)
    assert normalising.input_mean.dtype == torch.float64
    with torch.no_grad():
        assert all(o.dtype == torch.float64 for o in normalising(x.double()))


@pytest.mark.parametrize("size", DETECTION_SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_detection_input_sizes(family, size):
    torch.manual_seed(0)
    model = build_backbone(family, first_variant(family)).eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, *size))
    assert [tuple(o.shape) for o in outputs] == expected_shapes(model, 1, *size)
    assert all(torch.isfinite(o).all() for o in outputs)


# -- per model YAML ------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_case", _yaml_cases())
def test_model_yaml_builds_trains_one_step_and_fuses(yaml_case):
    family, cfg = yaml_case
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=3)
    backbone = model.model[0]
    assert isinstance(backbone, FAMILIES[family]) and backbone.out_strides == (8, 16, 32)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    training_loss(model.train(), torch.rand(2, 3, 128, 128)).backward()
    assert parameters_without_gradient(model) == []
    perturb_(model).eval()  # BN statistics away from the identity, so that every fold matters
    x = torch.rand(1, 3, 160, 128)
    with torch.no_grad():
        before = model(x)[0]
        params = count_parameters(model)
        model.fuse()
        after = model(x)[0]
    assert backbone.is_reparameterized and count_parameters(model) <= params
    assert relative_diff(after, before) <= 1e-4
