"""bf16 on the CPU: InferenceBackend(bf16=True), val.py --bf16 and train.py --amp, refused clearly where
the CPU has no native bf16 (engine.precision.cpu_bf16_support is monkeypatched both ways)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import engine.precision as precision
from engine.backend import InferenceBackend
from engine.callbacks import Callback
from engine.checkpoint import checkpoint_dict, save_checkpoint
from engine.exporter import compare_outputs
from engine.trainer import Trainer, TrainOptions
from models.yolo import DetectionModel
from tests.test_export import calibrate_batchnorm
from utils.general import resolve_config, yaml_load

IMGSZ = 128
SHALLOW = {  # five convs and a head: deep random nets amplify any rounding, trained ones do not
    "nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
    "backbone": [[-1, 1, "Conv", [16, 6, 2, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [64, 3, 2]],
                 [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "Conv", [256, 3, 2]]],
    "head": [[[2, 3, 4], 1, "Detect", ["nc", "anchors"]]],
}


@pytest.fixture(scope="module")
def shallow_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DetectionModel(SHALLOW)
    model.names = ["a", "b", "c"]
    calibrate_batchnorm(model, IMGSZ)
    return save_checkpoint(checkpoint_dict(model), tmp_path_factory.mktemp("bf16") / "shallow.pt")


@pytest.fixture
def native(monkeypatch):
    monkeypatch.delenv(precision.EMULATED_BF16_ENV, raising=False)
    support = precision.Bf16Support(True, "test: avx512_bf16")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: support)


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.delenv(precision.EMULATED_BF16_ENV, raising=False)
    support = precision.Bf16Support(False, "torch CPU capability AVX2; no avx512_bf16 flag")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: support)


def images(seed: int) -> torch.Tensor:
    return torch.rand((2, 3, IMGSZ, IMGSZ), generator=torch.Generator().manual_seed(seed))


def test_detector_reads_this_machines_capability():
    support = precision.cpu_bf16_support()
    assert str(torch.backends.cpu.get_cpu_capability()) in support.detected
    if torch.backends.cpu.get_cpu_capability() == "AVX2" and "amx_bf16" not in support.detected:
        assert not support.native


def test_bf16_refused_without_native_support(no_native, shallow_weights):
    with pytest.raises(ValueError, match=r"lacks native bf16 .*detected: torch CPU capability AVX2"):
        InferenceBackend(shallow_weights, bf16=True)


def test_bf16_refused_for_exports_and_with_half(native, tmp_path, shallow_weights):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")  # refused before the file is read
    with pytest.raises(ValueError, match=r"\.pt checkpoints .*model\.onnx is another export"):
        InferenceBackend(onnx_file, bf16=True)


def test_bf16_runs_where_supported_and_stays_close_to_fp32(native, shallow_weights):
    x = images(1)
    reference = InferenceBackend(shallow_weights)(x)
    backend = InferenceBackend(shallow_weights, bf16=True)
    assert backend.precision == "bf16" and not backend.bf16_emulated
    dtypes = {}
    model = backend.model
    model.model[0].register_forward_hook(lambda m, i, o: dtypes.__setitem__("first", o.dtype))
    model.model[-1].m[0].register_forward_hook(lambda m, i, o: dtypes.__setitem__("head", o.dtype))
    output = backend(x)
    assert output.dtype == torch.float32 and output.shape == reference.shape
    assert dtypes == {"first": torch.bfloat16, "head": torch.float32}  # head's output convs stay float32
    _, relative = compare_outputs(reference, output)
    assert 1e-4 < relative < 0.02  # bf16 really ran (fp32 reorderings give ~1e-6), and stayed close
    _, other_input = compare_outputs(reference, InferenceBackend(shallow_weights)(images(2)))
    assert other_input > 0.2  # the model follows its input: the closeness above means something


def test_emulated_bf16_only_when_asked(no_native, monkeypatch, shallow_weights):
    backend = InferenceBackend(shallow_weights, bf16=True, allow_emulated_bf16=True)
    assert backend.bf16_emulated and backend.precision == "bf16"
    monkeypatch.setenv(precision.EMULATED_BF16_ENV, "1")
    assert InferenceBackend(shallow_weights, bf16=True).bf16_emulated


def test_val_bf16_refused_with_exit_1(no_native, tiny_checkpoint, tiny_data, caplog, tmp_path):
    from val import main

    with caplog.at_level(logging.ERROR, logger="vitdet"):
        status = main(["--weights", str(tiny_checkpoint), "--data", str(tiny_data), "--bf16", "--imgsz", "64",
                       "--workers", "0", "--project", str(tmp_path)])
    assert status == 1
    assert any("lacks native bf16" in r.getMessage() for r in caplog.records)


def test_val_bf16_runs_where_supported(native, tiny_checkpoint, tiny_data, tmp_path):
    from val import run

    results, _ = run(weights=tiny_checkpoint, data=str(tiny_data), imgsz=64, workers=0, bf16=True,
                     project=tmp_path, plots=False, device="cpu")
    reference, _ = run(weights=tiny_checkpoint, data=str(tiny_data), imgsz=64, workers=0, project=tmp_path,
                       plots=False, device="cpu")
    assert 0 <= results.map <= 1 and abs(results.map - reference.map) < 0.05


def _options(tmp_path, data, **extra) -> TrainOptions:
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    return TrainOptions(cfg="yolov5n.yaml", data=str(data), hyp=hyp, epochs=1, batch_size=16, imgsz=64,
                        workers=0, noautoanchor=True, noplots=True, save_dir=str(tmp_path / "run"), **extra)


def test_train_amp_refused_on_a_cpu_without_bf16(no_native, tmp_path, tiny_data):
    with pytest.raises(ValueError, match=r"--amp .*lacks native bf16"):
        Trainer(_options(tmp_path, tiny_data, amp=True), torch.device("cpu"))
    trainer = Trainer(_options(tmp_path, tiny_data), torch.device("cpu"))  # without --amp: float32
    assert not trainer.amp and not trainer.scaler.is_enabled()


def test_train_amp_flag_reaches_the_options():
    from train import build_parser

    opt = build_parser().parse_args(["--cfg", "yolov5n.yaml", "--amp"])
    assert TrainOptions.from_dict(vars(opt)).amp is True


def test_train_amp_trains_in_bf16_without_a_scaler_where_supported(native, tmp_path, tiny_data):
    trainer = Trainer(_options(tmp_path, tiny_data, amp=True), torch.device("cpu"))
    assert trainer.amp and trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    seen = []

    class RecordDtype(Callback):
        def before_train(self, t):
            first = t.model.model[0]
            first.register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)

    trainer.callbacks.append(RecordDtype())
    trainer.run()
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(trainer.mean_losses).all() and trainer.mean_losses.sum() > 0


def _bench_args(**extra):
    import argparse

    flags = dict(imgsz=64, runs=1, warmup=0, threads=0, bf16=True, onnx=False, int8=False, openvino=False,
                 detect_fps=False, train_step=False, memory=False)
    return argparse.Namespace(**{**flags, **extra})


def test_benchmark_bf16_column_is_na_without_native_bf16_and_timed_with_it(monkeypatch):
    import benchmarks

    support = {"native": False}
    monkeypatch.setattr(precision, "cpu_bf16_support",
                        lambda: precision.Bf16Support(support["native"], "test"))
    cfg = str(resolve_config("yolov5n.yaml", "models"))
    without = benchmarks.measure(cfg, _bench_args())
    assert without["bf16_ms"] == benchmarks.NO_NATIVE_BF16 and "bf16_gflops_s" not in without
    support["native"] = True
    with_bf16 = benchmarks.measure(cfg, _bench_args())
    assert isinstance(with_bf16["bf16_ms"], float) and with_bf16["bf16_ms"] > 0
    assert with_bf16["bf16_gflops_s"] == pytest.approx(with_bf16["gflops"] / with_bf16["bf16_ms"] * 1e3)
    reference = {**without, "model": benchmarks.REFERENCE}
    rows = [reference, with_bf16]
    benchmarks.add_ratios(rows)  # a text cell in the reference row has no ratio, numbers do
    assert "bf16_ms_x" not in with_bf16 and with_bf16["params_x"] == pytest.approx(1.0)
    assert not [k for row in rows for k in row if k.endswith("_x_x")]  # ratios of values, not of ratios
    assert "n/a (no native bf16)" in benchmarks.to_markdown(rows)
