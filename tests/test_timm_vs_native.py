"""Our native families and the Timm node, loaded from the same timm checkpoint file, give the same
maps where the architectures agree (offline, random weights).

- FastViT-T8 (native, `out_norms=False`: no per-output BN, which no timm file holds) and timm's
  fastvit_t8: strides 8/16/32.
- EfficientViT-M0 in its paper layout (`layout="native"`, stages at 16/32/64) and timm's
  efficientvit_m0: strides 16/32 (the Timm node builds nothing above 32; the native default
  `layout="detection"` moves the stages to 8/16/32, which timm has no model for).
- LeViT: timm's levit_128s is fixed to 224x224 (its attention-bias tables and reshapes), so the Timm
  node refuses it with that size; our native LeViT is the one that runs at detection sizes.
"""

from __future__ import annotations

import pytest
import torch

from models.backbones import build_backbone
from tests.backbone_helpers import one_thread, perturb_, relative_diff  # noqa: F401

timm = pytest.importorskip("timm")

CASES = [
    pytest.param("FastViT", "t8", "fastvit_t8", (8, 16, 32), {"out_norms": False}, id="fastvit_t8"),
    pytest.param("EfficientViT", "m0", "efficientvit_m0", (16, 32), {"layout": "native"},
                 id="efficientvit_m0"),
]


@pytest.mark.parametrize("family, variant, timm_name, strides, options", CASES)
def test_native_family_and_timm_node_agree(family, variant, timm_name, strides, options, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / f"{timm_name}.pth"
    torch.save(perturb_(timm.create_model(timm_name), scale=0.01).state_dict(), path)
    native = build_backbone(family, variant, out_strides=strides, weights=str(path), **options).eval()
    node = build_backbone("Timm", timm_name, out_strides=strides, weights=str(path)).eval()
    assert native.out_channels == node.out_channels
    for height, width in [(64, 96), (224, 224)]:
        x = torch.rand(1, 3, height, width)
        with torch.no_grad():
            ours, theirs = native(x), node(x)
        assert [o.shape for o in ours] == [t.shape for t in theirs]
        assert all(relative_diff(o, t) <= 1e-5 for o, t in zip(ours, theirs)), (height, width)


def test_timm_levit_is_refused_with_the_size_it_needs():
    with pytest.raises(ValueError, match=r"levit_128s: cannot run at 128x96 .*built for 224x224"):
        build_backbone("Timm", "levit_128s")
