"""Backbones from the user's own code: `register_backbone` in a file passed as --plugin.

A plugin file written to a temporary folder registers a small backbone; a model YAML uses it; train.py
trains one tiny epoch with --plugin, val.py and detect.py load the checkpoint with --plugin, and
without the plugin the error names the file to pass. The registration is undone after each test, so
the registry of the other test modules is untouched.
"""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest
import torch
import yaml

import detect
import train
import val
from engine.checkpoint import load_checkpoint
from engine.detector import Detector
from models.backbones import BACKBONES, build_backbone
from models.backbones.plugins import load_plugin, register_backbone
from models.yolo import DetectionModel
from tests.backbone_helpers import (  # noqa: F401  (one_thread: autouse)
    detection_yaml,
    one_thread,
    parameters_without_gradient,
    perturb_,
    random_projection,
    relative_diff,
)

PLUGIN = textwrap.dedent('''
    """A user's backbone: three strided ConvBN stages (strides 8, 16, 32)."""
    from torch import nn

    from models.backbones import Backbone, Feature
    from models.backbones.layers import ConvBN
    from models.backbones.plugins import register_backbone


    @register_backbone
    class PluginNet(Backbone):
        family = "PluginNet"
        variants = {"s": (8, 16, 24)}

        @classmethod
        def declare_features(cls, widths):
            return [Feature(8 * 2 ** i, w, f"stages.{i}") for i, w in enumerate(widths)]

        def __init__(self, variant, out_strides=None, normalize_input=True):
            super().__init__(variant, out_strides, normalize_input=normalize_input)
            widths = self.config
            self.stem = ConvBN(3, widths[0], 3, stride=4, activation=nn.ReLU())
            self.stages = nn.ModuleList(
                ConvBN(widths[max(i - 1, 0)], w, 3, stride=2, activation=nn.ReLU())
                for i, w in enumerate(widths[: self.num_built("stages")]))

        def forward_features(self, x):
            x, maps = self.stem(x), []
            for feature, stage in zip(self.feature_info, self.stages):
                x = stage(x)
                if feature.stride in self.out_strides:
                    maps.append(x)
            return maps
''')


@pytest.fixture
def plugin_file(tmp_path):
    """The plugin file; afterwards its backbone and module are removed from the process."""
    path = tmp_path / "my_backbones.py"
    path.write_text(PLUGIN)
    before = set(sys.modules)
    yield path
    if "PluginNet" in BACKBONES:
        BACKBONES.remove("PluginNet")
    for name in set(sys.modules) - before:
        if name.startswith("vitdet_plugin_"):
            del sys.modules[name]


def unload(plugin_name: str = "PluginNet") -> None:
    BACKBONES.remove(plugin_name)
    for name in [n for n in sys.modules if n.startswith("vitdet_plugin_my_backbones")]:
        del sys.modules[name]


def test_register_decorator_and_plugin_loading(plugin_file):
    load_plugin(plugin_file)
    load_plugin(plugin_file)  # once per process: no double registration
    assert BACKBONES.get("PluginNet").source == str(plugin_file.resolve())
    node = build_backbone("PluginNet", "s")
    assert node.output_shape() == {8: 8, 16: 16, 32: 24}
    # the contract's core checks hold for a plugin family as for a shipped one
    x = torch.rand(2, 3, 64, 96)
    random_projection(node.train()(x)).backward()
    assert parameters_without_gradient(node) == []
    perturb_(node).eval()
    with torch.no_grad():
        before = node(x)
        node.reparameterize()
        after = node(x)
    assert [tuple(o.shape[1:]) for o in after] == [(8, 8, 12), (16, 4, 6), (24, 2, 3)]
    assert all(relative_diff(a, b) <= 1e-5 for a, b in zip(after, before))
    model = DetectionModel(detection_yaml("PluginNet", "s"))
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    with pytest.raises(KeyError, match="registered twice"):
        register_backbone(type(node))
    with pytest.raises(FileNotFoundError, match="not a Python file"):
        load_plugin(plugin_file.with_suffix(".txt"))


@pytest.mark.slow
def test_plugin_backbone_trains_saves_and_loads_in_val_and_detect(plugin_file, tmp_path, tiny_data, caplog):
    cfg = tmp_path / "plugin.yaml"
    cfg.write_text(yaml.safe_dump(detection_yaml("PluginNet", "s")))
    args = ["--cfg", str(cfg), "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64",
            "--batch-size", "8", "--workers", "0", "--noautoanchor", "--project", str(tmp_path),
            "--name", "exp"]
    assert train.main([*args, "--plugin", str(plugin_file)]) == 0
    weights = tmp_path / "exp" / "weights" / "last.pt"
    record = load_checkpoint(weights)["backbone"]
    assert record == {"name": "PluginNet", "plugin": "my_backbones.py"}
    val_args = ["--weights", str(weights), "--data", str(tiny_data), "--imgsz", "64", "--project",
                str(tmp_path), "--name", "val"]
    assert val.main([*val_args, "--plugin", str(plugin_file)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    import cv2
    import numpy as np

    cv2.imwrite(str(images / "a.jpg"), np.full((64, 96, 3), 120, np.uint8))
    detect_args = ["--weights", str(weights), "--source", str(images), "--imgsz", "64", "--project",
                   str(tmp_path), "--name", "det"]
    assert detect.main([*detect_args, "--plugin", str(plugin_file)]) == 0
    assert (tmp_path / "det" / "a.jpg").is_file()
    unload()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert val.main(val_args) == 1
    assert "plugin my_backbones.py" in caplog.text and "--plugin" in caplog.text
    with pytest.raises(ValueError, match="plugin my_backbones.py"):
        Detector(weights)
    finetune = [*args[2:-2], "--name", "ft", "--weights", str(weights)]
    for resume_or_finetune in (["--resume", str(weights)], finetune):
        with pytest.raises(ValueError, match=f"{weights}: its backbone PluginNet comes from the plugin "
                           "my_backbones.py, which is not loaded; pass --plugin"):
            train.main(resume_or_finetune)  # `python train.py` prints it as one line (engine/cli.py)
    assert Detector(weights, plugins=[plugin_file]).names


def test_checkpoint_of_a_timm_model_missing_from_timm_is_refused(tmp_path):
    from engine.checkpoint import checkpoint_dict, load_detection_model, save_checkpoint

    torch.manual_seed(0)
    model = DetectionModel(detection_yaml("Timm", "regnetx_002"))
    ckpt = checkpoint_dict(model)
    assert ckpt["backbone"]["timm_model"] == "regnetx_002" and ckpt["backbone"]["plugin"] is None
    ckpt["backbone"]["timm_model"] = "regnetx_999"
    ckpt["yaml"]["backbone"][0][3] = ["regnetx_999"]
    path = save_checkpoint(ckpt, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"timm model regnetx_999 .*installed timm \d"):
        load_detection_model(path)


def test_register_module_wraps_a_plain_module_with_declared_strides():
    from torch import nn

    from models.backbones.plugins import register_module

    @register_module("PlainPyramid", strides=(8, 16, 32), channels=(8, 16, 24))
    class PlainPyramid(nn.Module):
        def __init__(self):
            super().__init__()
            self.p8 = nn.Conv2d(3, 8, 8, 8)
            self.p16 = nn.Conv2d(8, 16, 2, 2)
            self.p32 = nn.Conv2d(16, 24, 2, 2)

        def forward(self, x):
            a = self.p8(x)
            b = self.p16(a)
            return [a, b, self.p32(b)]

    try:
        assert isinstance(PlainPyramid(), nn.Module)  # the class itself is unchanged
        model = DetectionModel(detection_yaml("PlainPyramid", "default"))
        assert model.model[0].output_shape() == {8: 8, 16: 16, 32: 24}
        d = detection_yaml("PlainPyramid", "default")
        d["backbone"][0][3] = []
        assert DetectionModel(d).stride.tolist() == [8.0, 16.0, 32.0]
    finally:
        BACKBONES.remove("PlainPyramid")
