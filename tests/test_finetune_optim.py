"""Fine-tuning hyperparameters: backbone_lr_mult and layer_decay give the promised per-group learning rates
(built, through the warmup, the schedule and a resume), drop_path sets the backbone's stochastic depth,
and configs/hyps/hyp.finetune-vit.yaml is a valid recipe."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from engine.trainer import Trainer, TrainOptions
from engine.weights import backbone_parameter_depths, model_config_with_drop_path, parameter_lr_scales
from models.backbones.layers import DropPath
from models.yolo import DetectionModel
from tests.backbone_helpers import one_thread  # noqa: F401  (autouse)
from utils.general import resolve_config, yaml_load
from utils.hyp import check_hyp
from utils.optim import lr_lambda, smart_optimizer, warmup_step

MULT, DECAY, LR0 = 0.5, 0.8, 0.001


@pytest.fixture(scope="module")
def fastvit_model() -> DetectionModel:
    return DetectionModel("yolov5-fastvit-t8.yaml", nc=6)


def _expected_scale(name: str) -> float:
    """FastViT-T8 (depths 2, 2, 4, 2): stem 0, blocks 1..10 in order, N = 11; downsampling with the
    first block of its stage; output norms and neck 1."""
    if not name.startswith("model.0.") or name.startswith("model.0.norms."):
        return 1.0
    rest = name.removeprefix("model.0.")
    if rest.startswith("stem."):
        return MULT * DECAY ** 11
    stage = int(rest.split(".")[1])
    first = 1 + sum((2, 2, 4, 2)[:stage])
    block = int(rest.split(".")[3]) if ".blocks." in rest else 0
    return MULT * DECAY ** (11 - (first + block))


def _lr_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, dict]]:
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: (groups[id(p)]["lr"], groups[id(p)]) for name, p in model.named_parameters()}


def test_layer_decay_and_backbone_multiplier_per_parameter(fastvit_model):
    depths, total = backbone_parameter_depths(fastvit_model)
    assert total == 11
    assert depths["model.0.stages.3.blocks.1.ffn.fc1.weight"] == 10
    assert depths["model.0.stages.1.downsample.pointwise.conv_branches.0.conv.weight"] == 3
    scales = parameter_lr_scales(fastvit_model, MULT, DECAY)
    assert all(name.startswith("model.0.") for name in scales)
    for name, _ in fastvit_model.named_parameters():
        assert scales.get(name, 1.0) == pytest.approx(_expected_scale(name), rel=1e-12), name
    assert parameter_lr_scales(fastvit_model) == {}


def test_optimizer_groups_warmup_schedule_and_resume_keep_the_multipliers(fastvit_model, caplog):
    scales = parameter_lr_scales(fastvit_model, MULT, DECAY)
    with caplog.at_level("INFO", logger="vitdet"):
        optimizer = smart_optimizer(fastvit_model, "AdamW", LR0, 0.9, 0.05, lr_scales=scales)
    assert "group  0: bias" in caplog.text and f"lr={LR0 * MULT * DECAY ** 11:.3g}" in caplog.text
    lf = lr_lambda(10, 0.01, cos=True)
    scheduler = LambdaLR(optimizer, lr_lambda=lf)
    first = optimizer.param_groups[0]
    assert first["kind"] == "bias" and first["lr_scale"] == 1.0  # YOLOv5's group 0: full-lr biases
    for name, (lr, group) in _lr_of(optimizer, fastvit_model).items():
        assert lr == pytest.approx(LR0 * _expected_scale(name), rel=1e-9), name
        expected_decay = 0.05 if group["kind"] == "decay" else 0.0
        assert group["weight_decay"] == expected_decay, name
        if name.endswith(".bias") or "layer_scale" in name or ".norms." in name:
            assert group["weight_decay"] == 0.0, name
    hyp = {"warmup_bias_lr": 0.1, "warmup_momentum": 0.8, "momentum": 0.9}
    warmup_step(optimizer, 0, 100, 0, lf, hyp, 64, 16)  # start of warmup
    for name, (lr, group) in _lr_of(optimizer, fastvit_model).items():
        start = 0.1 * _expected_scale(name) if group["kind"] == "bias" else 0.0
        assert lr == pytest.approx(start, rel=1e-9), name
    warmup_step(optimizer, 100, 100, 0, lf, hyp, 64, 16)  # end of warmup
    for name, (lr, _) in _lr_of(optimizer, fastvit_model).items():
        assert lr == pytest.approx(LR0 * _expected_scale(name), rel=1e-9), name
    scheduler.step()
    scheduler.step()
    for name, (lr, _) in _lr_of(optimizer, fastvit_model).items():
        assert lr == pytest.approx(LR0 * _expected_scale(name) * lf(2), rel=1e-9), name
    # resume: a fresh optimiser and scheduler take the saved state and continue with the same lrs
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    again = smart_optimizer(fastvit_model, "AdamW", LR0, 0.9, 0.05, lr_scales=scales)
    again_scheduler = LambdaLR(again, lr_lambda=lr_lambda(10, 0.01, cos=True))
    again.load_state_dict(saved["optimizer"])
    again_scheduler.load_state_dict(saved["scheduler"])
    again_scheduler.step()
    scheduler.step()
    assert [g["lr"] for g in again.param_groups] == pytest.approx([g["lr"] for g in optimizer.param_groups])
    assert [g["lr_scale"] for g in again.param_groups] == [g["lr_scale"] for g in optimizer.param_groups]


def test_yaml_rows_backbone_decays_by_row():
    model = DetectionModel("yolov5n.yaml", nc=6)
    rows = len(model.yaml["backbone"])
    scales = parameter_lr_scales(model, 1.0, 0.5)
    assert scales["model.0.conv.weight"] == pytest.approx(0.5 ** rows)
    assert scales[f"model.{rows - 1}.cv1.conv.weight"] == pytest.approx(0.5)
    assert f"model.{rows}.conv.weight" not in scales


def test_drop_path_hyp_sets_the_backbone_rate_or_is_refused():
    config = model_config_with_drop_path("yolov5-fastvit-t8.yaml", 0.2)
    rates = [m.rate for m in DetectionModel(config, nc=6).model[0].modules() if isinstance(m, DropPath)]
    assert max(rates) == pytest.approx(0.2) and min(rates) == 0.0
    assert config["backbone"][0][3] == [{"arch": "t8", "drop_path_rate": 0.2}]
    with pytest.raises(ValueError, match="no stochastic depth"):
        model_config_with_drop_path("yolov5-efficientvit-m0.yaml", 0.1)


def test_finetune_recipe_is_valid_and_the_trainer_uses_it(tmp_path, tiny_data):
    hyp = check_hyp(yaml_load(resolve_config("hyp.finetune-vit.yaml", "hyps")), "hyp.finetune-vit.yaml")
    assert hyp["backbone_lr_mult"] < 1 and 0 < hyp["layer_decay"] < 1
    hyp["drop_path"] = 0.1
    options = TrainOptions(cfg="yolov5-fastvit-t8.yaml", data=str(tiny_data), hyp=hyp, epochs=2,
                           batch_size=8, imgsz=64, workers=0, noautoanchor=True, noplots=True,
                           optimizer="AdamW", cos_lr=True, save_dir=str(tmp_path / "run"))
    trainer = Trainer(options, torch.device("cpu"))
    trainer.setup()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    expected = parameter_lr_scales(trainer.model, hyp["backbone_lr_mult"], hyp["layer_decay"])
    for name, (lr, _) in _lr_of(trainer.optimizer, trainer.model).items():
        assert lr == pytest.approx(hyp["lr0"] * expected.get(name, 1.0), rel=1e-9), name
    rates = [m.rate for m in trainer.model.model[0].modules() if isinstance(m, DropPath)]
    assert max(rates) == pytest.approx(0.1)


def test_results_csv_has_one_lr_column_per_optimiser_group(tmp_path, tiny_data):
    # layer_decay gives more than YOLOv5's three groups: the header must name every lr a row holds
    import csv

    import yaml

    import train

    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    hyp_file = tmp_path / "hyp.yaml"
    hyp_file.write_text(yaml.safe_dump({**hyp, "layer_decay": 0.8}))
    args = ["--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--hyp", str(hyp_file), "--epochs", "1",
            "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--noautoanchor", "--noplots",
            "--project", str(tmp_path), "--name", "run"]
    assert train.main(args) == 0
    with open(tmp_path / "run" / "results.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    lr_columns = [c for c in header if c.startswith("x/lr")]
    assert len(lr_columns) > 3 and lr_columns == [f"x/lr{i}" for i in range(len(lr_columns))]
    assert len(rows) == 1 and len(rows[0]) == len(header)
