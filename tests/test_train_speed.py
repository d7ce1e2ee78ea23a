"""--channels-last and --compile in the trainer's step, and benchmarks.py --train-speed's measurement."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine import train_speed
from engine.train_speed import measure_variant, synthetic_batch


def test_channels_last_step_trains_in_nhwc(monkeypatch):
    seen = {}
    real = train_speed._step_trainer

    def keep(*args):
        seen["trainer"] = trainer = real(*args)
        return trainer

    monkeypatch.setattr(train_speed, "_step_trainer", keep)
    result = measure_variant("yolov5n.yaml", "channels-last", imgsz=64, batch_size=2, steps=1,
                             device=torch.device("cpu"), warmup=1)
    assert result.images_per_s > 0 and result.note == ""
    trainer = seen["trainer"]
    conv = trainer.model.model[0].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert trainer.ema.updates >= 0 and torch.isfinite(trainer.loss_items).all()


def test_channels_last_is_refused_for_strided_pointwise_convs_on_the_cpu(tmp_path):
    from engine.trainer import to_channels_last
    from utils.torch_utils import strided_pointwise_convs

    # torch's CPU channels-last backward of a strided 1x1 conv corrupts the heap (FastViT's stem crashed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Conv2d(8, 8, 1, 2),
                                torch.nn.Conv2d(8, 8, 1, 1), torch.nn.Conv2d(8, 8, 1, (1, 2)))
    assert strided_pointwise_convs(model) == ["1", "3"]
    with pytest.raises(ValueError, match=r"layer 1 and 1 more is a 1x1 convolution with a stride"):
        to_channels_last(model, torch.device("cpu"))
    assert model[1].weight.is_contiguous()  # left as it was
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Conv2d(8, 8, 1, 1))
    to_channels_last(plain, torch.device("cpu"))
    assert plain[1].weight.is_contiguous(memory_format=torch.channels_last)
    yaml_text = (Path(__file__).parents[1] / "configs/models/yolov5n.yaml").read_text()
    strided = tmp_path / "strided.yaml"
    strided.write_text(yaml_text.replace("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv, [128, 1, 2]]", 1))
    assert strided.read_text() != yaml_text
    result = measure_variant(str(strided), "channels-last", imgsz=64, batch_size=2, steps=1,
                             device=torch.device("cpu"), warmup=1)
    assert result.images_per_s is None
    assert result.note.startswith("refused: --channels-last on the CPU: layer")


def test_a_failing_compile_falls_back_to_eager_with_a_message(monkeypatch, caplog):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("inductor: no C++ compiler")

    requests = []
    monkeypatch.setattr(torch, "compile", lambda net, **options: requests.append(options) or Broken())
    with caplog.at_level(logging.WARNING, logger="vitdet"):
        result = measure_variant("yolov5n.yaml", "compile", imgsz=64, batch_size=2, steps=1,
                                 device=torch.device("cpu"), warmup=1)
    assert result.images_per_s > 0 and result.note.startswith("compile failed")
    assert "--compile: torch.compile failed (RuntimeError: inductor: no C++ compiler)" in caplog.text
    # static shapes: the epoch's last, smaller batch gets its own graph instead of a slower symbolic one
    assert requests == [{"dynamic": False}]


def test_multi_scale_compiles_with_symbolic_shapes(monkeypatch):
    from types import SimpleNamespace

    from engine.trainer import Trainer

    requests = []
    monkeypatch.setattr(torch, "compile", lambda net, **options: requests.append(options) or net)
    trainer = SimpleNamespace(options=SimpleNamespace(compile=True, multi_scale=True), is_main=False)
    net = torch.nn.Identity()
    assert Trainer._compile(trainer, net) is net and requests == [{"dynamic": None}]


def test_bf16_is_skipped_without_native_bf16(monkeypatch):
    from engine.precision import Bf16Support

    monkeypatch.setattr(train_speed, "cpu_bf16_support", lambda: Bf16Support(False, "AVX2 only"))
    result = measure_variant("yolov5n.yaml", "bf16", 64, 2, 1, torch.device("cpu"))
    assert result.images_per_s is None and "no native bf16 (AVX2 only)" in result.note


def test_synthetic_batch_has_valid_targets():
    images, targets, paths = synthetic_batch(3, 64, torch.device("cpu"))
    assert images.shape == (3, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert targets.shape == (12, 6) and set(targets[:, 0].tolist()) == {0.0, 1.0, 2.0} and len(paths) == 3
    assert ((targets[:, 2:4] - targets[:, 4:6] / 2) >= 0).all() and ((targets[:, 2:4] + targets[:, 4:6] / 2) <= 1).all()


def test_unknown_variant_is_refused(tmp_path):
    import benchmarks

    with pytest.raises(ValueError, match="--variants: unknown fp64"):
        benchmarks.main(["--train-speed", "--cfg", "yolov5n.yaml", "--variants", "fp64", "--out", str(tmp_path / "b")])


def test_speed_flags_reach_the_trainer_options():
    import train
    from engine.trainer import TrainOptions

    opt = train.build_parser().parse_args(["--cfg", "yolov5n.yaml", "--channels-last", "--compile"])
    options = TrainOptions.from_dict(vars(opt))
    assert options.channels_last and options.compile
    assert not TrainOptions.from_dict(vars(train.build_parser().parse_args(["--cfg", "yolov5n.yaml"]))).compile


def test_a_model_yaml_outside_the_project_is_timed_from_its_path(tmp_path):
    from engine.train_speed import train_speed_table
    from utils.general import resolve_config

    own = tmp_path / "my-model.yaml"
    own.write_text(resolve_config("yolov5n.yaml", "models").read_text())
    table = train_speed_table([str(own)], ["fp32"], 64, 2, 1, torch.device("cpu"))
    row = table.splitlines()[-1]
    assert row.startswith("| my-model.yaml | fp32 | ") and float(row.split("|")[3]) > 0
