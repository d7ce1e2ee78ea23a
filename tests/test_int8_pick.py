"""export.py --int8 without --include: both INT8 flavours (ONNX Runtime QDQ and NNCF OpenVINO) are tried,
a refused one is skipped, and the accepted ones are timed to name the fastest."""

from __future__ import annotations

import logging

import pytest

from engine import formats
from engine.exporter import ExportError, export_and_verify
from engine.formats.int8 import Int8GateError
from export import main as export_main
from tests.test_int8 import IMGSZ, make_weights

pytest.importorskip("openvino")
pytest.importorskip("nncf")

FLAVOURS = {"onnx_int8", "openvino_int8"}


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_int8_alone_writes_both_flavours_times_them_and_names_the_fastest(tmp_path, tiny_data, caplog):
    weights = make_weights(tmp_path)
    with caplog.at_level(logging.INFO, logger="vitdet"):
        results = export_and_verify(weights, imgsz=IMGSZ, int8=True, data=tiny_data, calib=4,
                                    int8_tolerance=1.0)
    assert set(results) == {"onnx", "openvino"} | FLAVOURS  # no torchscript: the INT8 request's formats
    latency = {key: results[key].metrics["latency_ms"] for key in FLAVOURS}
    assert all(ms > 0 for ms in latency.values())
    fastest = [key for key in FLAVOURS if results[key].metrics.get("fastest")]
    assert fastest == [min(latency, key=latency.get)]
    message = _messages(caplog)
    assert "--int8 without --include: exporting onnx and openvino with their INT8 models" in message
    assert f"Fastest: {results[fastest[0]].path} -- deploy it with python detect.py --weights " \
           f"{results[fastest[0]].path}" in message
    onnx_ms, openvino_ms = latency["onnx_int8"], latency["openvino_int8"]
    timings = f"w_int8.onnx {onnx_ms:.1f} ms, w_int8_openvino_model {openvino_ms:.1f} ms"
    assert timings in message
    float_ms = results["onnx"].metrics["latency_ms"]  # the float file, timed in the same rounds
    assert float_ms > 0
    assert ("INT8 does not pay off" in message) == (float_ms < min(latency.values()))


def test_the_pick_says_when_the_float_file_beats_every_int8_file(tmp_path, monkeypatch, caplog):
    from engine import latency
    from engine.exporter import FLOAT_REFERENCE, ExportResult, name_fastest_int8

    medians = {"onnx_int8": 72.8, "openvino_int8": 76.6, FLOAT_REFERENCE: 56.3}  # FastViT's, AVX2 machine

    def fake_latency(files, imgsz, runs, warmup):
        return [{"file": k, "path": str(p), "input": f"{imgsz}x{imgsz}", "median_ms": medians[k]}
                for k, p in files.items()]

    monkeypatch.setattr(latency, "alternating_latency", fake_latency)
    int8 = {key: ExportResult(tmp_path / f"{key}.file") for key in ("onnx_int8", "openvino_int8")}
    float_file = ExportResult(tmp_path / "best.onnx")
    with caplog.at_level(logging.INFO, logger="vitdet"):
        assert name_fastest_int8(int8, 320, float_file) == "onnx_int8"
    assert float_file.metrics["latency_ms"] == 56.3 and int8["onnx_int8"].metrics["fastest"]
    message = _messages(caplog)
    best = tmp_path / "best.onnx"
    assert f"the float32 {best} ran 56.3 ms in the same rounds, faster than every INT8" in message
    assert f"deploy it with python detect.py --weights {tmp_path / 'best.onnx'}" in message
    medians[FLOAT_REFERENCE] = 90.0  # slower than INT8: no warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitdet"):
        name_fastest_int8(int8, 320, ExportResult(tmp_path / "best.onnx"))
    assert "does not pay off" not in _messages(caplog)


def _refuse_openvino_int8(monkeypatch):
    def refuse(float_result, target, job):
        raise Int8GateError(f"openvino_int8 export of {target.name} failed: drop 0.5 > tolerance 0.01")

    monkeypatch.setattr(formats.get("openvino"), "quantize", refuse)


def test_a_refused_flavour_is_skipped_without_include_and_fails_an_explicit_request(
        tmp_path, tiny_data, monkeypatch, caplog):
    _refuse_openvino_int8(monkeypatch)
    weights = make_weights(tmp_path)
    args = ["--weights", str(weights), "--int8", "--data", str(tiny_data), "--imgsz", str(IMGSZ), "--calib",
            "4", "--int8-tolerance", "1"]
    with caplog.at_level(logging.INFO, logger="vitdet"):
        assert export_main(args) == 0
    message = _messages(caplog)
    assert "openvino_int8: no INT8 model of this flavour (openvino_int8 export of w_int8_openvino_model " \
           "failed: drop 0.5" in message
    assert "Fastest:" not in message  # one accepted file: nothing to compare
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["w.onnx", "w.pt", "w_int8.onnx", "w_openvino_model"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitdet"):  # the user named the formats: all or nothing
        assert export_main(args + ["--include", "onnx", "openvino"]) == 1
    failed = "export failed: openvino_int8 export of w_int8_openvino_model failed: drop 0.5"
    assert failed in _messages(caplog)


def test_int8_alone_fails_when_every_flavour_is_refused(tmp_path, tiny_data, monkeypatch):
    _refuse_openvino_int8(monkeypatch)
    weights = make_weights(tmp_path)
    refused = (r"no INT8 flavour passed: onnx_int8 export of w_int8.onnx failed: .*; "
               r"openvino_int8 export of w_int8_openvino_model failed: drop 0.5")
    with pytest.raises(ExportError, match=refused):
        export_and_verify(weights, imgsz=IMGSZ, int8=True, data=tiny_data, calib=4, int8_tolerance=-1)
    assert not weights.with_name("w_int8.onnx").exists()


def test_qdq_openvino_without_an_accepted_onnx_file_is_an_export_error_not_a_crash(tmp_path, tiny_data):
    weights = make_weights(tmp_path)
    no_onnx = ("openvino_int8 export of w_int8_openvino_model failed: --openvino-int8 qdq converts the INT8 "
               "ONNX file, and none was accepted")
    with pytest.raises(ExportError, match=no_onnx):
        export_and_verify(weights, imgsz=IMGSZ, int8=True, data=tiny_data, calib=4, int8_tolerance=-1,
                          openvino_int8="qdq")


def test_the_pick_says_when_the_machine_was_too_busy_to_trust_the_timing(monkeypatch):
    import os

    from engine.exporter import busy_machine

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.8, 3.4, 2.5))
    assert busy_machine() == "the machine was busy (load 3.8 on 2 cores)"
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 0.5))  # our own two threads: not busy
    assert busy_machine() == ""
