"""detect.py --profile: one line of per-frame stage times at the end of the run."""

from __future__ import annotations

import logging
import re

import cv2
import numpy as np

from engine.profiling import STAGES, StageTimer


def test_profile_logs_every_stage_per_frame(tiny_checkpoint, tmp_path, caplog):
    from detect import main as detect_main

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.jpg"), np.full((48, 64, 3), 40 * i, np.uint8))
    with caplog.at_level(logging.INFO, logger="vitdet"):
        status = detect_main(["--weights", str(tiny_checkpoint), "--source", str(folder), "--imgsz", "64",
                              "--device", "cpu", "--profile", "--project", str(tmp_path), "--name", "d"])
    assert status == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Profile per frame:")]
    assert len(lines) == 1, lines
    values = dict(re.findall(r"([a-zA-Z/-]+) (\d+\.\d)ms", lines[0]))
    assert set(values) == {*STAGES, "wall"}, lines[0]
    assert float(values["inference"]) > 0 and float(values["draw/write"]) > 0 and float(values["read"]) > 0
    assert re.search(r"\((\d+\.\d) frames/s\)$", lines[0])


def test_stage_timer_sums_what_it_wraps():
    timer = StageTimer()
    assert list(timer.iterate("read", [1, 2, 3])) == [1, 2, 3]
    assert timer.wrap("NMS", lambda a, b=0: a + b)(2, b=3) == 5
    timer.add("inference", 0.5)
    assert timer.totals["inference"] == 0.5 and timer.totals["read"] > 0 and timer.totals["NMS"] > 0
    assert "inference 250.0ms" in timer.line(2)


def test_detect_gives_torch_one_thread_while_another_runtime_infers(tmp_path, monkeypatch):
    import torch

    from engine.detector import Detector
    from engine.exporter import export_and_verify
    from engine.predictor import run
    from tests.test_int8 import make_weights

    weights = make_weights(tmp_path)
    onnx_file = export_and_verify(weights, include=("onnx",), imgsz=64, dynamic=True)["onnx"].path
    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((48, 64, 3), 90, np.uint8))
    seen = []
    real_forward = Detector.forward
    monkeypatch.setattr(Detector, "forward", lambda self, x: seen.append(torch.get_num_threads()) or
                        real_forward(self, x))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for path in (onnx_file, weights):
            run(path, tmp_path / "a.jpg", imgsz=64, device="cpu", project=tmp_path, name="d")
            assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(previous)
    assert seen == [1, 2]  # ONNX Runtime infers: torch gets one thread; eager PyTorch keeps its threads
