"""The contract every export format of the registry (engine.formats) keeps: written where its Format says,
metadata read back, outputs equal to the checkpoint's within the format's tolerance, a static export
refusing another input shape, a dynamic one taking any, and the overwrite rules. A new format gets these
tests by being registered."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data.builtin import CLASS_NAMES
from engine import formats
from engine.backend import InferenceBackend
from engine.exporter import compare_outputs, export_and_verify
from tests.test_int8 import make_weights

EXPORTABLE = formats.exportable()
IMGSZ = (64, 96)


def _available(name: str) -> None:
    if name == "openvino":
        pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_weights(tmp_path_factory.mktemp("contract"))


@pytest.fixture(scope="module")
def static_exports(weights):
    """{format: path} of one static (64x96) export per format, all next to the same weights."""
    exports = {}
    for name in EXPORTABLE:
        if name == "openvino" and not _has_openvino():
            continue
        exports[name] = export_and_verify(weights, include=(name,), imgsz=IMGSZ)[name].path
    return exports


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_registry_lists_every_format_once_with_its_capabilities():
    assert list(formats.FORMATS) == ["pytorch", "torchscript", "onnx", "openvino"]
    assert EXPORTABLE == ("torchscript", "onnx", "openvino")
    assert formats.int8_formats() == ("onnx", "openvino")
    for name, fmt in formats.FORMATS.items():
        assert fmt.name == name and isinstance(fmt.capabilities, formats.Capabilities)
        assert formats.format_of(fmt.target(Path("w.pt"))) is fmt  # a format recognises its own file name
        assert formats.format_of(fmt.target(Path("w.pt"), int8=True)) is fmt
    with pytest.raises(ValueError, match="unknown format 'tflite'; expected one of pytorch, torchscript"):
        formats.get("tflite")


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_is_written_where_its_format_says_with_metadata_that_reads_back(name, weights, static_exports):
    _available(name)
    fmt, path = formats.get(name), static_exports[name]
    assert path == fmt.target(weights) and fmt.exists(path) and formats.format_of(path) is fmt
    meta = fmt.read_metadata(path)
    assert meta["exporter"] == "vitdet" and meta["weights"] == "w.pt" and len(meta["weights_sha256"]) == 64
    assert meta["stride"] == 32 and meta["names"] == list(CLASS_NAMES) and meta["nc"] == len(CLASS_NAMES)
    assert meta["shape"] == [1, 3, *IMGSZ] and meta["dynamic"] is False and meta["precision"] == "fp32"


@pytest.mark.parametrize("name", EXPORTABLE)
def test_runner_gives_the_checkpoint_output_within_the_format_tolerance(name, weights, static_exports):
    _available(name)
    fmt = formats.get(name)
    runner = fmt.runner(static_exports[name], torch.device("cpu"), formats.RunOptions())
    assert isinstance(runner, formats.Runner)
    assert (runner.stride, runner.names, runner.fixed_shape, runner.precision) == (32, list(CLASS_NAMES),
                                                                                   (1, *IMGSZ), "fp32")
    checkpoint = formats.get("pytorch").runner(weights, torch.device("cpu"), formats.RunOptions())
    x = torch.rand((1, 3, *IMGSZ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, relative = compare_outputs(checkpoint(x), runner(x))
    assert relative <= fmt.tolerance


@pytest.mark.parametrize("name", EXPORTABLE)
def test_a_static_export_refuses_another_input_shape(name, static_exports):
    _available(name)
    backend = InferenceBackend(static_exports[name])
    with pytest.raises(ValueError, match=r"exported for 64x96 input, got 96x64; use --imgsz 64 96"):
        backend(torch.zeros(1, 3, 96, 64))
    assert backend(torch.zeros(3, 3, *IMGSZ)).shape[0] == 3  # another batch: run in chunks


@pytest.mark.parametrize("name", [n for n in EXPORTABLE if formats.get(n).capabilities.dynamic])
def test_a_dynamic_export_takes_other_sizes_and_batches(name, tmp_path):
    _available(name)
    weights = make_weights(tmp_path)
    path = export_and_verify(weights, include=(name,), imgsz=IMGSZ, dynamic=True)[name].path
    assert formats.get(name).read_metadata(path)["dynamic"] is True
    backend = InferenceBackend(path)
    x = torch.rand((2, 3, 96, 128), generator=torch.Generator().manual_seed(6))
    _, relative = compare_outputs(InferenceBackend(weights)(x), backend(x))
    assert backend.dynamic and relative <= formats.get(name).tolerance


@pytest.mark.parametrize("name", EXPORTABLE)
def test_overwrite_rules_replace_our_export_and_keep_anything_else(name, tmp_path):
    _available(name)
    fmt = formats.get(name)
    weights = make_weights(tmp_path)
    first = export_and_verify(weights, include=(name,), imgsz=IMGSZ)[name].path
    again = export_and_verify(weights, include=(name,), imgsz=IMGSZ)[name].path  # our export: replaced
    assert again == first and fmt.read_metadata(again)["weights"] == "w.pt"
    other = weights.with_name("other.pt")
    shutil.copy(weights, other)
    foreign = fmt.target(other)
    if fmt.is_dir:
        foreign.mkdir()
        (foreign / "mine.txt").write_text("keep")
    else:
        foreign.write_bytes(b"not an export")
    with pytest.raises(FileExistsError, match=f"{foreign.name} exists and is not this project's export"):
        export_and_verify(other, include=(name,), imgsz=IMGSZ)
    if fmt.is_dir:
        assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
    else:
        assert foreign.read_bytes() == b"not an export"
