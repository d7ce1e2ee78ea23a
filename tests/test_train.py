"""train.py end to end: artefacts, flags, resume after a real kill, DDP, learning on the built-in data."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from engine.checkpoint import load_checkpoint
from engine.callbacks import result_columns

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--imgsz", "128", "--batch-size", "8", "--workers", "0", "--noautoanchor"]


def _train(tmp_path, data, *extra, name="exp"):
    args = ["--cfg", "yolov5n.yaml", "--data", str(data), "--project", str(tmp_path), "--name", name, *FAST, *extra]
    assert train.main(args) == 0
    return tmp_path / name


def _rows(run: Path) -> list[dict]:
    with open(run / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_one_epoch_writes_yolov5_artefacts(tmp_path, tiny_data):
    run = _train(tmp_path, tiny_data, "--epochs", "1")
    for name in ["opt.yaml", "hyp.yaml", "results.csv", "results.png", "labels.jpg", "train_batch0.jpg",
                 "train_batch1.jpg", "train_batch2.jpg", "confusion_matrix.png", "PR_curve.png",
                 "F1_curve.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg", "weights/last.pt",
                 "weights/best.pt"]:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    rows = _rows(run)
    ckpt = torch.load(run / "weights" / "last.pt", weights_only=True)
    groups = len(ckpt["optimizer"]["param_groups"])
    assert groups == 3 and tuple(rows[0]) == result_columns(groups) and len(rows) == 1  # YOLOv5's x/lr0..2
    assert ckpt["epoch"] == 0 and ckpt["names"][0] == "circle" and ckpt["nc"] == 6
    assert set(ckpt) >= {"model", "ema", "optimizer", "scheduler", "opt", "hyp", "rng", "best_fitness", "yaml"}
    assert not list(run.glob("weights/.*tmp"))  # no temporary files left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--rect", "--multi-scale"], "contradict"),
        (["--freeze", "head"], "--freeze takes"),
        (["--label-smoothing", "1.5"], "--label-smoothing"),
        (["--optimizer", "Lion"], "invalid choice"),
        (["--sync-bn"], "only applies to DDP"),
    ],
)
def test_bad_flags_are_refused_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit):
        train.main(["--cfg", "yolov5n.yaml", *args])
    assert message in capsys.readouterr().err


def test_missing_model_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.main([])
    assert "give --cfg" in capsys.readouterr().err


def test_freeze_backbone_freezes_the_backbone_section():
    from models.yolo import DetectionModel
    from engine.weights import freeze_layers

    model = DetectionModel("yolov5n.yaml")
    frozen = freeze_layers(model, ["backbone"])
    assert frozen and all(int(n.split(".")[1]) <= 9 for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if int(n.split(".")[1]) > 9)
    frozen3 = freeze_layers(DetectionModel("yolov5n.yaml"), ["3"])
    assert {int(n.split(".")[1]) for n in frozen3} == {0, 1, 2}


@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_batch(tmp_path, tiny_data, monkeypatch):
    from utils import loss as loss_module

    real_call = loss_module.ComputeLoss.__call__

    def nan_loss(self, preds, targets):
        loss, items = real_call(self, preds, targets)
        return loss * float("nan"), items

    monkeypatch.setattr(loss_module.ComputeLoss, "__call__", nan_loss)
    with pytest.raises(FloatingPointError, match=r"at epoch 0 batch 0"):
        _train(tmp_path, tiny_data, "--epochs", "1")


def _cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for_epoch(last: Path, epoch: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll until last.pt holds `epoch` (it is written atomically, so any read sees a whole file)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if last.exists() and load_checkpoint(last)["epoch"] >= epoch:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the checkpoint")


@pytest.mark.slow
def test_resume_after_kill_is_exact(tmp_path, tiny_data):
    common = ["train.py", "--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--epochs", "3", "--deterministic",
              "--project", str(tmp_path), *FAST, "--imgsz", "96"]
    full = _cli([*common, "--name", "full"])
    assert full.wait(timeout=900) == 0, full.stdout.read()

    killed = _cli([*common, "--name", "killed"])
    last = tmp_path / "killed" / "weights" / "last.pt"
    _wait_for_epoch(last, 1, killed)  # epochs 0 and 1 done: kill during the third
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert load_checkpoint(last)["epoch"] == 1  # the kill left a whole, loadable checkpoint
    resumed = _cli(["train.py", "--resume", str(last)])
    assert resumed.wait(timeout=900) == 0, resumed.stdout.read()

    a = load_checkpoint(tmp_path / "full" / "weights" / "last.pt")
    b = load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "ema"):
        diff = max((a[part][k].float() - b[part][k].float()).abs().max().item() for k in a[part])
        assert diff == 0, f"{part} differs by {diff} after resume"
    assert _rows(tmp_path / "full") == _rows(tmp_path / "killed")


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process_artefacts(tmp_path, tiny_data):
    args = ["--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--epochs", "1", "--device", "cpu",
            "--project", str(tmp_path), *FAST]
    ddp = _cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "train.py",
                *args, "--name", "ddp"])
    out = ddp.communicate(timeout=900)[0]
    assert ddp.returncode == 0, out
    single = _train(tmp_path, tiny_data, "--epochs", "1", "--device", "cpu", name="single")
    def artefacts(run: Path) -> list[str]:
        # validation runs at 2x the per-rank batch (as YOLOv5), so DDP plots more val_batch* mosaics
        # TensorBoard names its event file by time and pid: compare it as one "events" entry
        names = (p.relative_to(run).as_posix() for p in run.rglob("*"))
        names = ("events" if n.startswith("events.out.tfevents.") else n for n in names)
        return sorted(n for n in names if not (n.startswith("val_batch") and not n.startswith("val_batch0")))

    assert artefacts(tmp_path / "ddp") == artefacts(single)
    assert not (tmp_path / "ddp2").exists()  # rank 1 wrote nothing of its own
    ckpt = load_checkpoint(tmp_path / "ddp" / "weights" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["opt"]["batch_size"] == 8
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped


@pytest.mark.slow
def test_training_learns_on_builtin_data(tmp_path):
    """12 short epochs of yolov5n on the built-in dataset (384 batches of 8, the first 100 in warmup).
    Measured on 2 CPU cores: mAP50 0.0008 after epoch 0, 0.055 by epoch 8."""
    run = _train(tmp_path, "builtin.yaml", "--epochs", "12", "--imgsz", "256", "--batch-size", "8", "--workers", "2",
                 "--noplots")
    maps = [float(r["metrics/mAP_0.5"]) for r in _rows(run)]
    assert max(maps[-3:]) > max(0.03, 10 * maps[0]), maps
