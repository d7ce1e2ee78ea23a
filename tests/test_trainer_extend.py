"""Extending the Trainer without editing it: build steps overridden in a subclass, default callbacks
dropped or replaced by name, and early stopping that no callback's position can get wrong."""

from __future__ import annotations

import csv

import pytest
import torch

from engine.callbacks import (
    Callback,
    Checkpointer,
    default_callbacks,
    drop_callbacks,
    replace_callbacks,
)
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.trainer import Trainer, TrainOptions
from utils.general import resolve_config, yaml_load

LOSS_ITEMS = (1.0, 2.0, 3.0)  # what the custom criterion reports, so results.csv shows it was used


def _options(tmp_path, data, **extra) -> TrainOptions:
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    values = dict(cfg="yolov5n.yaml", data=str(data), hyp=hyp, epochs=2, batch_size=8, imgsz=64, workers=0,
                  noautoanchor=True, noplots=True, save_dir=str(tmp_path / "run"))
    return TrainOptions(**{**values, **extra})


class CountingLoss:
    """The default loss, counted, reporting fixed loss items (the loss itself is the real one)."""

    def __init__(self, inner):
        self.inner, self.training_calls = inner, 0

    def __call__(self, preds, targets):
        loss, _ = self.inner(preds, targets)
        self.training_calls += torch.is_grad_enabled()  # the validator's calls run under no_grad
        return loss, torch.tensor(LOSS_ITEMS, device=loss.device)


class CustomLossTrainer(Trainer):
    def build_criterion(self):
        return CountingLoss(super().build_criterion())


class EveryEpochFile(Callback):
    """Replaces the default checkpoint: weights/custom{epoch}.pt, nothing else."""

    name = "checkpoint"
    main_process_only = True

    def __init__(self):
        self.saved: list[int] = []

    def after_epoch(self, trainer):
        save_checkpoint(trainer.checkpoint(), trainer.weights_dir / f"custom{trainer.epoch}.pt")
        self.saved.append(trainer.epoch)


class Fitness(Callback):
    name = "fitness"

    def __init__(self):
        self.by_epoch: dict[int, float] = {}

    def after_epoch(self, trainer):
        self.by_epoch[trainer.epoch] = trainer.fitness


def test_subclass_with_own_loss_and_a_replaced_checkpoint_trains(tmp_path, tiny_data):
    options = _options(tmp_path, tiny_data, patience=1)
    checkpoint, fitness = EveryEpochFile(), Fitness()
    # the replacement runs first: it must still save this epoch's early-stopping state
    defaults = [checkpoint, *drop_callbacks(default_callbacks(options), "checkpoint", "tensorboard")]
    trainer = CustomLossTrainer(options, torch.device("cpu"), callbacks=[fitness], defaults=defaults)
    trainer.run()

    assert isinstance(trainer.compute_loss, CountingLoss)
    epochs = len(checkpoint.saved)
    assert trainer.compute_loss.training_calls == trainer.batches_per_epoch * epochs == 4 * epochs
    with open(tmp_path / "run" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == epochs and all(
        (float(r["train/box_loss"]), float(r["train/obj_loss"]), float(r["train/cls_loss"])) == LOSS_ITEMS
        for r in rows)
    weights = sorted(p.name for p in (tmp_path / "run" / "weights").iterdir())
    assert weights == [f"custom{e}.pt" for e in range(epochs)]  # no last.pt / best.pt: the default is gone
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))  # tensorboard dropped
    first = load_checkpoint(tmp_path / "run" / "weights" / "custom0.pt")
    # patience 1: after epoch 0's update the next epoch may stop (the state before any update says False)
    assert first["early_stopping"] == {"best_fitness": fitness.by_epoch[0], "best_epoch": 0, "possible_stop": True}


def test_default_callbacks_are_named_and_edited_by_name(tmp_path):
    options = _options(tmp_path, "unused.yaml")
    defaults = default_callbacks(options)
    names = [c.name for c in defaults]
    assert names == ["progress", "results_csv", "tensorboard", "checkpoint"]  # noplots: no plots
    assert [c.name for c in default_callbacks(_options(tmp_path, "x", noplots=False))][3] == "plots"
    mine = EveryEpochFile()
    replaced = replace_callbacks(defaults, checkpoint=mine)
    assert replaced[:3] == defaults[:3] and replaced[3] is mine and defaults[3] is not mine  # copy, in place
    assert [c.name for c in drop_callbacks(defaults, "tensorboard", "progress")] == ["results_csv", "checkpoint"]
    trainer = Trainer(options, torch.device("cpu"), defaults=drop_callbacks(defaults, "tensorboard"))
    assert [c.name for c in trainer.callbacks] == ["progress", "results_csv", "checkpoint"]


@pytest.mark.parametrize("edit", [lambda cbs: drop_callbacks(cbs, "tensorbord"),
                                  lambda cbs: replace_callbacks(cbs, checkpoints=Checkpointer())])
def test_unknown_callback_names_are_refused_with_the_known_ones(tmp_path, edit):
    with pytest.raises(ValueError, match=r"no callback named '(tensorbord|checkpoints)'; the list holds "
                                         r"progress, results_csv, tensorboard, checkpoint"):
        edit(default_callbacks(_options(tmp_path, "unused.yaml")))


def test_duplicate_names_and_rank_filtering(tmp_path, monkeypatch):
    options = _options(tmp_path, "unused.yaml")
    with pytest.raises(ValueError, match="checkpoint appears more than once"):
        Trainer(options, torch.device("cpu"), callbacks=[EveryEpochFile()])  # the default is still there

    class Everywhere(Callback):
        name = "everywhere"

    monkeypatch.setenv("RANK", "1")  # a second torchrun process: only callbacks not bound to rank 0 run
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    trainer = Trainer(options, torch.device("cpu"), callbacks=[Everywhere()])
    assert [c.name for c in trainer.callbacks] == ["everywhere"]


def test_a_subclass_changes_the_defaults_with_build_callbacks(tmp_path):
    class Quiet(Trainer):
        def build_callbacks(self):
            return drop_callbacks(super().build_callbacks(), "progress", "tensorboard")

    assert [c.name for c in Quiet(_options(tmp_path, "x"), torch.device("cpu")).callbacks] == [
        "results_csv", "checkpoint"]
