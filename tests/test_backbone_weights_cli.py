"""train.py --backbone-weights: an official release or a timm file fills the backbone node of a --cfg
model before any step; a file of another variant is refused (or kept in part with
--backbone-weights-partial); the path is not stored in checkpoints; --weights is refused with it."""

from __future__ import annotations

import pytest
import torch

import train
from engine.trainer import Trainer, TrainOptions
from models.backbones.fastvit import convert_official_state_dict
from tests.backbone_helpers import one_thread  # noqa: F401  (autouse)
from tests.test_backbone_fastvit import official_keys, rule_filled, save_apple_release
from utils.general import resolve_config, yaml_load


def _options(tmp_path, data, cfg: str, **extra) -> TrainOptions:
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    return TrainOptions(cfg=cfg, data=str(data), hyp=hyp, epochs=1, batch_size=8, imgsz=64, workers=0,
                        noautoanchor=True, noplots=True, save_dir=str(tmp_path / "run"), **extra)


def _set_up(options: TrainOptions) -> Trainer:
    trainer = Trainer(options, torch.device("cpu"))
    trainer.setup()
    return trainer


def _assert_backbone_holds(trainer: Trainer, expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor (our names) is in the model's and the EMA's backbone, reshaped only."""
    for module in (trainer.model, trainer.ema.ema):
        ours = module.model[0].state_dict()
        for key, value in expected.items():
            assert torch.equal(ours[key], value.reshape(ours[key].shape).to(ours[key].dtype)), key


def test_official_release_fills_the_backbone_at_epoch_0(tmp_path, tiny_data):
    release = rule_filled(official_keys("t8"))
    path = save_apple_release(release, tmp_path / "fastvit_t8.pth.tar")
    trainer = _set_up(_options(tmp_path, tiny_data, "yolov5-fastvit-t8.yaml", backbone_weights=path))
    expected, ignored = convert_official_state_dict(release, "t8")
    assert ignored  # the classifier
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    backbone_keys = {k for k in trainer.model.model[0].state_dict() if not k.endswith("num_batches_tracked")}
    assert set(expected) == backbone_keys - {k for k in backbone_keys if k.startswith("norms.")}
    _assert_backbone_holds(trainer, expected)
    opt = trainer.checkpoint()["opt"]
    assert "backbone_weights" not in opt and path not in str(opt)


def test_timm_file_fills_the_backbone_at_epoch_0(tmp_path, tiny_data):
    timm = pytest.importorskip("timm")
    from models.backbones.levit import convert_official_state
    from models.backbones.timm_maps import timm_to_official

    torch.manual_seed(0)
    reference = timm.create_model("levit_128s", pretrained=False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "levit_128s_timm.pth"
    torch.save(reference.state_dict(), path)
    trainer = _set_up(_options(tmp_path, tiny_data, "yolov5-levit.yaml", backbone_weights=str(path)))
    official = timm_to_official("LeViT", reference.state_dict(), "128s")
    expected, _ = convert_official_state(official, "128s")
    built = trainer.model.model[0].state_dict()
    expected = {k: v for k, v in expected.items() if k in built and not k.endswith("num_batches_tracked")}
    assert len(expected) == len([k for k in built if not k.endswith("num_batches_tracked")])
    _assert_backbone_holds(trainer, expected)


def test_another_variant_is_refused_naming_tensors_unless_partial(tmp_path, tiny_data, caplog):
    path = save_apple_release(rule_filled(official_keys("s12")), tmp_path / "fastvit_s12.pth.tar")
    cfg = yaml_load(resolve_config("yolov5-fastvit.yaml", "models"))
    cfg["backbone"][0][3] = ["t12"]  # same widths and depths as S12, MLP ratio 3 instead of 4
    first = r"SHAPE MISMATCH 36: stages\.0\.blocks\.0\.ffn\.fc1\.bias \(256,\)->\(192,\)"
    with pytest.raises(RuntimeError, match="does not fit FastViT-t12.*" + first):
        _set_up(_options(tmp_path, tiny_data, cfg, backbone_weights=path))
    caplog.set_level("WARNING", logger="vitdet")
    options = _options(tmp_path, tiny_data, cfg, backbone_weights=path, backbone_weights_partial=True)
    trainer = _set_up(options)
    assert "--backbone-weights-partial" in caplog.text
    stem = trainer.model.model[0].state_dict()["stem.0.conv_branches.0.conv.weight"]
    assert torch.equal(stem, rule_filled(official_keys("s12"))["patch_embed.0.rbr_conv.0.conv.weight"])


def test_backbone_weights_with_our_checkpoint_or_a_rows_backbone_is_refused(tmp_path, tiny_data, capsys):
    with pytest.raises(SystemExit):
        train.main(["--weights", "x.pt", "--backbone-weights", "y.pth"])
    assert "--backbone-weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--weights alone"):
        _set_up(_options(tmp_path, tiny_data, "yolov5n.yaml", backbone_weights="y.pth", weights="x.pt"))
    with pytest.raises(ValueError, match="no backbone node"):
        _set_up(_options(tmp_path, tiny_data, "yolov5n.yaml", backbone_weights="y.pth"))
