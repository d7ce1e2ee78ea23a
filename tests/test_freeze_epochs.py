"""--freeze backbone --freeze-epochs K: the neck and head train alone for K epochs, then the backbone joins
(same optimiser, its parameters were in their groups all along), also across a resume."""

from __future__ import annotations

import pytest
import torch

import train
from engine.callbacks import Callback
from engine.trainer import Trainer, TrainOptions
from utils.general import resolve_config, yaml_load


class Watch(Callback):
    """Per epoch: were the backbone rows trainable, did backbone / neck parameters move, which optimiser."""

    def __init__(self, backbone_rows: int):
        self.prefixes = tuple(f"model.{i}." for i in range(backbone_rows))
        self.epochs: dict[int, dict] = {}
        self._before: dict[str, torch.Tensor] = {}

    def _params(self, trainer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def before_epoch(self, trainer):
        self._before = self._params(trainer)
        backbone = [p for n, p in trainer.model.named_parameters() if n.startswith(self.prefixes)]
        self.epochs[trainer.epoch] = {"trainable": {p.requires_grad for p in backbone},
                                      "optimizer": id(trainer.optimizer)}

    def after_epoch(self, trainer):
        after = self._params(trainer)
        moved = {n for n in after if not torch.equal(after[n], self._before[n])}
        record = self.epochs[trainer.epoch]
        record["backbone_moved"] = any(n.startswith(self.prefixes) for n in moved)
        record["neck_moved"] = any(not n.startswith(self.prefixes) for n in moved)
        in_groups = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        record["all_in_optimizer"] = all(id(p) in in_groups for p in trainer.model.parameters())


class StopAfterFirstEpoch(Callback):
    def after_epoch(self, trainer):
        trainer.stop_requested = True


def _options(tmp_path, data, **extra) -> TrainOptions:
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    values = dict(cfg="yolov5n.yaml", data=str(data), hyp=hyp, epochs=3, batch_size=8, imgsz=64, workers=0,
                  noautoanchor=True, noplots=True, noval=True,
                  freeze=["backbone"], freeze_epochs=2, save_dir=str(tmp_path / "run"))
    return TrainOptions(**{**values, **extra})


def test_backbone_unfreezes_at_epoch_k_and_a_resume_knows_where_it_is(tmp_path, tiny_data):
    rows = len(yaml_load(resolve_config("yolov5n.yaml", "models"))["backbone"])
    first = Watch(rows)
    callbacks = [first, StopAfterFirstEpoch()]
    Trainer(_options(tmp_path, tiny_data), torch.device("cpu"), callbacks=callbacks).run()
    assert list(first.epochs) == [0]
    epoch0 = first.epochs[0]
    assert epoch0["trainable"] == {False} and not epoch0["backbone_moved"] and epoch0["neck_moved"]
    assert epoch0["all_in_optimizer"]  # frozen parameters stay in their groups

    last = tmp_path / "run" / "weights" / "last.pt"
    resumed = Watch(rows)
    Trainer(_options(tmp_path, tiny_data, resume=True, resume_path=str(last)), torch.device("cpu"),
            callbacks=[resumed]).run()
    assert list(resumed.epochs) == [1, 2]
    epoch1, epoch2 = resumed.epochs[1], resumed.epochs[2]
    assert epoch1["trainable"] == {False} and not epoch1["backbone_moved"]  # still before K = 2
    assert epoch2["trainable"] == {True} and epoch2["backbone_moved"] and epoch2["neck_moved"]
    assert epoch1["optimizer"] == epoch2["optimizer"]  # not rebuilt to unfreeze


def test_resume_past_k_starts_unfrozen(tmp_path, tiny_data):
    options = _options(tmp_path, tiny_data, epochs=2, freeze_epochs=1)
    Trainer(options, torch.device("cpu"), callbacks=[StopAfterFirstEpoch()]).run()
    rows = len(yaml_load(resolve_config("yolov5n.yaml", "models"))["backbone"])
    watch = Watch(rows)
    last = tmp_path / "run" / "weights" / "last.pt"
    Trainer(_options(tmp_path, tiny_data, epochs=2, freeze_epochs=1, resume=True, resume_path=str(last)),
            torch.device("cpu"), callbacks=[watch]).run()
    assert list(watch.epochs) == [1]
    assert watch.epochs[1]["trainable"] == {True} and watch.epochs[1]["backbone_moved"]


@pytest.mark.parametrize("argv", [["--freeze-epochs", "2"],
                                  ["--freeze", "backbone", "--freeze-epochs", "-1"]])
def test_freeze_epochs_needs_freeze_and_a_positive_count(argv, capsys):
    with pytest.raises(SystemExit):
        train.main(["--cfg", "yolov5n.yaml", *argv])
    assert "--freeze-epochs" in capsys.readouterr().err
