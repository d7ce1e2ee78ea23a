"""engine/trainer.py in-process: callbacks at every point of the loop, and a resume that restores every
piece of state (GradScaler and early stopping included)."""

from __future__ import annotations

import csv

import pytest
import torch

from engine.callbacks import Callback, EarlyStopping
from engine.checkpoint import load_checkpoint
from engine.trainer import TrainOptions, Trainer
from utils.general import resolve_config, yaml_load


def _options(tmp_path, data, name: str, epochs: int = 2, **extra) -> TrainOptions:
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    return TrainOptions(cfg="yolov5n.yaml", data=str(data), hyp=hyp, epochs=epochs, batch_size=8, imgsz=96,
                        workers=0, noautoanchor=True, noplots=True, deterministic=True,
                        save_dir=str(tmp_path / name), **extra)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name in ("before_train", "before_epoch", "before_step", "after_step", "after_epoch", "after_train"):
            return lambda trainer: self.calls.append((name, trainer.epoch))
        return super().__getattribute__(name)


class StopAfterFirstEpoch(Callback):
    """Ends the run after epoch 0, as a kill after its checkpoint would."""

    def after_epoch(self, trainer):
        trainer.stop_requested = True


def _cpu_scaler() -> torch.amp.GradScaler:
    """A live GradScaler on the CPU whose scale changes every step (growth_interval=1), so its state matters."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)


def test_callbacks_are_called_at_every_point_and_can_stop_training(tmp_path, tiny_data):
    recorder = Recorder()
    trainer = Trainer(_options(tmp_path, tiny_data, "run", epochs=3), torch.device("cpu"),
                      callbacks=[recorder, StopAfterFirstEpoch()])
    trainer.run()
    names = [name for name, _ in recorder.calls]
    steps = trainer.batches_per_epoch
    assert steps == 4  # 32 images, batch 8
    assert names == ["before_train", "before_epoch", *["before_step", "after_step"] * steps, "after_epoch",
                     "after_train"]
    with open(tmp_path / "run" / "results.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0"]  # the callback stopped it after epoch 0
    assert load_checkpoint(tmp_path / "run" / "weights" / "last.pt")["epoch"] == 0


@pytest.mark.slow
def test_resume_restores_scaler_early_stopping_and_weights_exactly(tmp_path, tiny_data):
    device = torch.device("cpu")
    full = Trainer(_options(tmp_path, tiny_data, "full"), device)
    full.scaler = _cpu_scaler()
    full.run()

    first = Trainer(_options(tmp_path, tiny_data, "killed"), device, callbacks=[StopAfterFirstEpoch()])
    first.scaler = _cpu_scaler()
    first.run()
    last = tmp_path / "killed" / "weights" / "last.pt"
    saved = load_checkpoint(last)
    assert saved["scaler"]["scale"] != 2.0**10  # the scaler really moved during epoch 0
    assert saved["early_stopping"] == first.stopper.state_dict()

    resumed = Trainer(_options(tmp_path, tiny_data, "killed", resume=True, resume_path=str(last)), device)
    resumed.scaler = _cpu_scaler()
    resumed.setup()
    assert resumed.scaler.state_dict() == saved["scaler"]
    assert resumed.stopper.state_dict() == saved["early_stopping"]
    assert resumed.start_epoch == 1
    resumed = Trainer(_options(tmp_path, tiny_data, "killed", resume=True, resume_path=str(last)), device)
    resumed.scaler = _cpu_scaler()
    resumed.run()

    a, b = load_checkpoint(tmp_path / "full" / "weights" / "last.pt"), load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 1
    assert a["scaler"] == b["scaler"] and a["early_stopping"] == b["early_stopping"]
    for part in ("model", "ema"):
        diff = max((a[part][k].float() - b[part][k].float()).abs().max().item() for k in a[part])
        assert diff == 0, f"{part} differs by {diff} after resume"


def test_early_stopping_resumed_from_its_state_stops_at_the_same_epoch():
    fitness = [0.1, 0.3, 0.2, 0.25, 0.29, 0.28, 0.1]
    unbroken = EarlyStopping(patience=3)
    stop_unbroken = next(e for e, f in enumerate(fitness) if unbroken.update(e, f))
    before = EarlyStopping(patience=3)
    for e in range(3):
        before.update(e, fitness[e])
    after = EarlyStopping(patience=3)
    after.load_state_dict(before.state_dict())
    stop_resumed = next(e for e in range(3, len(fitness)) if after.update(e, fitness[e]))
    assert stop_unbroken == stop_resumed == 4
    fresh = EarlyStopping(patience=3)  # what a resume without the state did: counts from scratch
    assert not any(fresh.update(e, fitness[e]) for e in range(3, len(fitness)))


def test_options_from_an_older_checkpoint_keep_known_keys_only():
    options = TrainOptions.from_dict({"epochs": 5, "imgsz": 320, "no_longer_a_flag": True})
    assert options.epochs == 5 and options.imgsz == 320 and not hasattr(options, "no_longer_a_flag")
    assert options.as_plain_dict()["epochs"] == 5


def test_train_images_per_second_leaves_validation_out(monkeypatch, caplog):
    """The epoch's 'train images/s' counts the batches only: time spent validating after the last
    batch (every epoch of a normal run) must not lower it."""
    import logging
    from types import SimpleNamespace

    from engine import callbacks

    clock = iter([100.0, 102.0, 104.0, 164.0])  # epoch start, two batches 2 s apart, validation 60 s
    monkeypatch.setattr(callbacks.time, "time", lambda: next(clock))
    progress = callbacks.ProgressLog()
    trainer = SimpleNamespace(epoch=0, world_size=1, batches_per_epoch=2, options=SimpleNamespace(epochs=1),
                              mean_losses=torch.zeros(3), batch=(torch.zeros(8, 3, 32, 32), torch.zeros(5, 6), []),
                              compute_loss=None)
    monkeypatch.setattr(callbacks, "loss_names", lambda t: ("box", "obj", "cls"))
    progress.before_epoch(trainer)
    progress.after_step(trainer)
    progress.after_step(trainer)
    with caplog.at_level(logging.INFO, logger="vitdet"):
        progress.after_epoch(trainer)
    assert "epoch 0: 4.0 train images/s" in caplog.text  # 16 images in 4 s, not in 64 s
