"""The default recipe: --optimizer auto picks AdamW or SGD from the schedule's length, and `close_mosaic`
turns mosaic off for the last epochs; both are decided so that a resumed run agrees with the first."""

from __future__ import annotations

import logging

import pytest
import torch

import train
import utils.optim
from engine.callbacks import Callback
from engine.trainer import Trainer, TrainOptions
from utils.general import resolve_config, yaml_load
from utils.hyp import CLOSE_MOSAIC_EPOCHS, check_hyp
from utils.optim import AUTO_SGD_MIN_STEPS, choose_optimizer, optimizer_steps

SCRATCH = {"lr0": 0.01, "momentum": 0.937, "warmup_bias_lr": 0.1}


def test_schedule_length_counts_optimizer_steps_of_64_images():
    assert optimizer_steps(205, 16, 50) == 4 * 50  # BCCD's learning-table run: 200 steps
    assert optimizer_steps(205, 128, 50) == 2 * 50  # a batch above 64 is one step by itself
    assert optimizer_steps(118_287, 64, 300) == 1849 * 300


@pytest.mark.parametrize("nc, lr0", [(3, 0.001429), (1, 0.002), (80, 0.000119)])
def test_auto_picks_adamw_with_a_class_scaled_lr_for_short_schedules(nc, lr0):
    choice = choose_optimizer("auto", SCRATCH, n_images=64 * AUTO_SGD_MIN_STEPS // 100, batch_size=16,
                              epochs=100, nc=nc)  # exactly at the threshold: still short
    assert (choice.name, choice.lr0, choice.momentum, choice.warmup_bias_lr) == ("AdamW", lr0, 0.9, 0.0)
    assert f"{AUTO_SGD_MIN_STEPS} optimizer steps" in choice.reason and "AdamW" in choice.reason


def test_auto_keeps_the_sgd_recipe_of_the_hyp_file_for_long_schedules():
    choice = choose_optimizer("auto", SCRATCH, n_images=64 * AUTO_SGD_MIN_STEPS // 100 + 1, batch_size=16,
                              epochs=100, nc=3)  # one step more per epoch than the threshold allows
    assert (choice.name, choice.lr0, choice.momentum, choice.warmup_bias_lr) == ("SGD", 0.01, 0.937, 0.1)
    assert "SGD" in choice.reason and "> 10000" in choice.reason


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_an_explicit_optimizer_keeps_the_hyp_values_whatever_the_schedule(name):
    for n_images in (10, 10**7):
        choice = choose_optimizer(name, SCRATCH, n_images=n_images, batch_size=16, epochs=50, nc=3)
        assert (choice.name, choice.lr0, choice.momentum, choice.warmup_bias_lr) == (name, 0.01, 0.937, 0.1)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="auto, SGD, Adam, AdamW"):
        choose_optimizer("Lion", SCRATCH, n_images=10, batch_size=16, epochs=1, nc=3)


def test_train_py_defaults_to_auto():
    assert train.build_parser().parse_args(["--cfg", "yolov5n.yaml"]).optimizer == "auto"
    assert TrainOptions().optimizer == "auto"


def test_close_mosaic_has_a_documented_default_and_is_an_integer():
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    del hyp["close_mosaic"]
    assert check_hyp(hyp, "test")["close_mosaic"] == CLOSE_MOSAIC_EPOCHS == 0  # measured: docs/training.md
    hyp["close_mosaic"] = "3"
    assert check_hyp(hyp, "test")["close_mosaic"] == 3
    hyp["close_mosaic"] = -1
    with pytest.raises(ValueError, match="close_mosaic"):
        check_hyp(hyp, "test")


class Record(Callback):
    """Per epoch: was mosaic on, which optimiser class, its lr0 and beta1/momentum."""

    def __init__(self):
        self.epochs: dict[int, dict] = {}

    def before_epoch(self, trainer):
        group = trainer.optimizer.param_groups[0]
        momentum = group["betas"][0] if "betas" in group else group["momentum"]
        self.epochs[trainer.epoch] = {"mosaic": trainer.train_set.mosaic,
                                      "optimizer": type(trainer.optimizer).__name__,
                                      "initial_lr": group["initial_lr"], "momentum": momentum}


class StopAfterFirstEpoch(Callback):
    def after_epoch(self, trainer):
        trainer.stop_requested = True


def _options(tmp_path, data, **extra) -> TrainOptions:
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    hyp["close_mosaic"] = extra.pop("close_mosaic", 1)
    values = dict(cfg="yolov5n.yaml", data=str(data), hyp=hyp, epochs=3, batch_size=8, imgsz=64, workers=0,
                  noautoanchor=True, noplots=True, noval=True, save_dir=str(tmp_path / "run"))
    return TrainOptions(**{**values, **extra})


def test_auto_choice_is_logged_and_a_resume_keeps_it(tmp_path, tiny_data, caplog, monkeypatch):
    first = Record()
    with caplog.at_level(logging.INFO, logger="vitdet"):
        Trainer(_options(tmp_path, tiny_data), torch.device("cpu"), callbacks=[first, StopAfterFirstEpoch()]).run()
    lr0 = round(0.002 * 5 / (4 + 6), 6)  # the tiny data set has 6 classes; 32 images x 3 epochs = 3 steps
    assert first.epochs[0]["optimizer"] == "AdamW" and first.epochs[0]["momentum"] == 0.9
    assert first.epochs[0]["initial_lr"] == pytest.approx(lr0)
    assert f"optimizer: AdamW(lr0={lr0:g}, momentum=0.9, warmup_bias_lr=0)" in caplog.text
    assert "3 optimizer steps <= 10000" in caplog.text

    # Were the rule applied again it would now say SGD: the resumed run must keep the recorded AdamW.
    monkeypatch.setattr(utils.optim, "AUTO_SGD_MIN_STEPS", 0)
    assert choose_optimizer("auto", SCRATCH, 32, 8, 3, 6).name == "SGD"
    resumed = Record()
    last = tmp_path / "run" / "weights" / "last.pt"
    Trainer(_options(tmp_path, tiny_data, resume=True, resume_path=str(last)), torch.device("cpu"),
            callbacks=[resumed]).run()
    assert [e["optimizer"] for e in resumed.epochs.values()] == ["AdamW", "AdamW"]
    assert resumed.epochs[1]["initial_lr"] == pytest.approx(lr0)


def test_close_mosaic_turns_mosaic_off_for_the_last_epochs_across_a_resume(tmp_path, tiny_data):
    first = Record()
    Trainer(_options(tmp_path, tiny_data, close_mosaic=1), torch.device("cpu"),
            callbacks=[first, StopAfterFirstEpoch()]).run()
    assert first.epochs[0]["mosaic"] is True
    resumed = Record()
    last = tmp_path / "run" / "weights" / "last.pt"
    Trainer(_options(tmp_path, tiny_data, close_mosaic=1, resume=True, resume_path=str(last)),
            torch.device("cpu"), callbacks=[resumed]).run()
    assert {epoch: e["mosaic"] for epoch, e in resumed.epochs.items()} == {1: True, 2: False}


@pytest.mark.parametrize("close_mosaic, expected", [(0, [True, True]), (2, [False, False])])
def test_close_mosaic_zero_keeps_mosaic_and_a_long_one_turns_it_off_from_the_start(
        tmp_path, tiny_data, close_mosaic, expected):
    record = Record()
    Trainer(_options(tmp_path, tiny_data, close_mosaic=close_mosaic, epochs=2), torch.device("cpu"),
            callbacks=[record]).run()
    assert [e["mosaic"] for e in record.epochs.values()] == expected
