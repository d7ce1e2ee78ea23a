"""The GPU check: `python -m pytest -m cuda` (a few minutes on one GPU), plus the training speed figure

    python benchmarks.py --train-speed --cfg yolov5s.yaml --imgsz 640 --train-batch 16 --device 0

Every test here is skipped, with the reason, where torch.cuda.is_available() is False (CI, CPU machines).
What it checks on a GPU: float16 AMP training steps with the GradScaler for yolov5s and each default
backbone YAML (finite losses, the scaler's state in the checkpoint, a resume that ends with the same
weights as an unbroken run), val.py --half against float32, and export.py --half verified.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.callbacks import Callback
from engine.checkpoint import load_checkpoint
from engine.trainer import Trainer, TrainOptions
from utils.general import resolve_config, yaml_load

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]
MODELS = ["yolov5s.yaml", "yolov5-riformer.yaml", "yolov5-efficientvit.yaml", "yolov5-fastvit.yaml",
          "yolov5-mpvit.yaml", "yolov5-levit.yaml"]


def _options(tmp_path, data, cfg: str, name: str, **extra) -> TrainOptions:
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    return TrainOptions(cfg=str(resolve_config(cfg, "models")), data=str(data), hyp=hyp, epochs=2, batch_size=8,
                        imgsz=128, workers=0, noautoanchor=True, noplots=True, deterministic=True, device="0",
                        save_dir=str(tmp_path / name), **extra)


class LossWatch(Callback):
    name = "loss_watch"

    def __init__(self):
        self.losses: list[float] = []
        self.scales: list[float] = []

    def after_step(self, trainer):
        self.losses += trainer.loss_items.tolist()
        self.scales.append(trainer.scaler.get_scale())


class StopAfterFirstEpoch(Callback):
    name = "stop_after_first_epoch"

    def after_epoch(self, trainer):
        trainer.stop_requested = True


@pytest.fixture(autouse=True)
def _deterministic_cublas(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (exact resume)


@pytest.mark.parametrize("cfg", MODELS)
def test_amp_float16_training_with_scaler_resumes_exactly(tmp_path, tiny_data, cfg):
    device = torch.device("cuda", 0)
    watch = LossWatch()
    full = Trainer(_options(tmp_path, tiny_data, cfg, "full"), device, callbacks=[watch])
    assert full.amp and full.amp_dtype == torch.float16 and full.scaler.is_enabled()
    full.run()
    assert watch.losses and all(math.isfinite(x) for x in watch.losses), watch.losses
    Trainer(_options(tmp_path, tiny_data, cfg, "killed"), device, callbacks=[StopAfterFirstEpoch()]).run()
    last = tmp_path / "killed" / "weights" / "last.pt"
    saved = load_checkpoint(last)
    assert saved["scaler"] and saved["scaler"]["scale"] > 0  # the GradScaler's state is in the checkpoint
    resumed = Trainer(_options(tmp_path, tiny_data, cfg, "killed", resume=True, resume_path=str(last)), device)
    resumed.run()
    a, b = load_checkpoint(tmp_path / "full" / "weights" / "last.pt"), load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 1 and a["scaler"] == b["scaler"]
    for part in ("model", "ema"):
        diff = max((a[part][k].float() - b[part][k].float()).abs().max().item() for k in a[part])
        assert diff == 0, f"{cfg}: {part} differs by {diff} after resume"


def test_val_half_matches_float32(tiny_checkpoint, tiny_data, tmp_path):
    import val
    from engine.checkpoint import load_detection_model

    model = load_detection_model(tiny_checkpoint, torch.device("cuda", 0), fuse=True)
    x = torch.rand(2, 3, 128, 128, device="cuda")
    with torch.no_grad():
        full, half = model(x)[0], model.half()(x.half())[0].float()
    scores_diff = (full[..., 4:] - half[..., 4:]).abs().max().item()
    assert scores_diff < 1e-2, f"half scores differ by {scores_diff}"
    results = {}
    for precision in ("float32", "half"):
        results[precision], _ = val.run(weights=str(tiny_checkpoint), data=str(tiny_data), imgsz=128, device="0",
                                        half=precision == "half", workers=0, plots=False,
                                        project=str(tmp_path), name=precision)
    assert abs(results["half"].map - results["float32"].map) <= 0.01
    assert abs(results["half"].map50 - results["float32"].map50) <= 0.01


def test_export_half_is_verified(tiny_checkpoint, tmp_path):
    import shutil

    import export

    weights = shutil.copy(tiny_checkpoint, tmp_path / "model.pt")
    assert export.main(["--weights", str(weights), "--include", "torchscript", "onnx", "--half", "--device", "0",
                        "--imgsz", "128"]) == 0  # export_and_verify compares each export with the model
    assert (tmp_path / "model.torchscript").is_file() and (tmp_path / "model.onnx").is_file()


def test_train_speed_at_640_batch_16_runs():
    from engine.train_speed import measure_variant

    result = measure_variant("yolov5s.yaml", "fp32", imgsz=640, batch_size=16, steps=5,
                             device=torch.device("cuda", 0))
    assert result.images_per_s and result.images_per_s > 0
