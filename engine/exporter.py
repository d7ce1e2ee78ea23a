"""Export our checkpoints to TorchScript, ONNX (float32, or INT8 with `int8=True`) and OpenVINO, and
verify every export by running it.

The exported network is the fused/reparameterised `DetectionModel` with `Detect.export` set, so every
format returns one tensor (B, N, 5 + nc) of decoded rows [x, y, w, h (input pixels), obj, cls...] --
exactly what `engine.backend.InferenceBackend` returns for a checkpoint.

Each file carries its metadata (stride, class names, input shape, dynamic, half, the source weights):
ONNX in `metadata_props` (JSON-encoded values), TorchScript in `_extra_files['config.txt']` (JSON),
OpenVINO in `metadata.yaml` beside the IR (plus imgsz and batch, as Ultralytics writes it). Every file
also says its `precision` ('fp32', 'fp16' or 'int8').

INT8 (`int8=True`, export.py --int8 --data DATA.yaml): the verified float ONNX export is quantised
statically (engine.quantize: QDQ, U8S8 per-channel, calibrated on --calib images of the train split)
into `<stem>_int8.onnx`. Its check is accuracy, not equality: the float ONNX model and the INT8 model
are both validated on the dataset's val split, and a mAP50-95 drop above `int8_tolerance` fails the
export (ExportError naming both mAPs, the drop and the tolerance; no INT8 file is written). With
'openvino' in the formats too, the accepted INT8 file is also converted into
`<stem>_int8_openvino_model/` (OpenVINO runs the QDQ pairs as int8 ops), gated by its own val mAP.

Verification: each export is written to a temporary file, run on a seeded random input (and on a
second input size/batch when `dynamic`), and compared with the PyTorch output. The error is measured
relative to the output's scale: box columns relative to the largest box value, score columns (already
in [0, 1]) absolutely. Above `RELATIVE_TOLERANCE` the export fails with `ExportError` and the temporary
file is deleted, so a failed export never replaces a good one.

Overwriting: exports go next to the weights (`best.pt` -> `best.onnx`, `best.torchscript`,
`best_openvino_model/`). An existing file there is replaced only when its metadata says it is this
project's export of a weights file of the same name (as YOLOv5, which always overwrites its exports);
any other file is left alone and the export stops with FileExistsError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.backend import (
    TORCHSCRIPT_METADATA,
    InferenceBackend,
    check_img_size,
    read_onnx_metadata,
    read_torchscript_metadata,
)
from utils.files import atomic_dir, atomic_path, temp_name_beside
from utils.torch_utils import select_device

LOGGER = logging.getLogger(f"vitdet.{__name__}")

EXPORTER = "vitdet"  # written into every export; marks files this project may overwrite
FORMATS = ("torchscript", "onnx", "openvino")
DEFAULT_OPSET = 17
RELATIVE_TOLERANCE = 1e-3
SAMPLE_SEED = 0


INT8_OPS = ("auto", "full", "conv")  # export_int8's choices (engine.quantize.OP_TYPES, auto: full then conv)


class ExportError(RuntimeError):
    """An export that could not be written or that gives different numbers from the PyTorch model."""


@dataclass
class Verification:
    """One comparison of an export with the PyTorch model on the same input."""

    input_shape: tuple[int, ...]
    max_abs_diff: float
    relative_diff: float  # see compare_outputs


@dataclass
class ExportResult:
    path: Path
    checks: list[Verification] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # INT8: map_float, map_int8, drop, ops


# -- small helpers --------------------------------------------------------------------------------------
def target_path(weights: Path, fmt: str) -> Path:
    """Where `fmt` is written for `weights`: best.pt -> best.torchscript / best.onnx / best_openvino_model
    / best_int8.onnx (fmt 'onnx_int8') / best_int8_openvino_model (fmt 'openvino_int8')."""
    if fmt in ("openvino", "openvino_int8"):
        return weights.with_name(f"{weights.stem}{'_int8' if fmt == 'openvino_int8' else ''}_openvino_model")
    if fmt == "onnx_int8":
        return weights.with_name(f"{weights.stem}_int8.onnx")
    return weights.with_suffix(f".{fmt}")


def existing_export_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an existing export at `path` ({} when it has none or cannot be read as one)."""
    try:
        if path.is_dir():
            meta_file = path / "metadata.yaml"
            meta = yaml.safe_load(meta_file.read_text()) if meta_file.is_file() else None
            return meta if isinstance(meta, dict) else {}
        if path.suffix == ".onnx":
            return read_onnx_metadata(path)
        if path.suffix == ".torchscript":
            return read_torchscript_metadata(path)
    except Exception as err:  # any unreadable file is simply "not ours"
        LOGGER.debug(f"{path}: cannot read export metadata ({err})")
    return {}


def check_overwrite(target: Path, weights: Path) -> None:
    """Allow replacing `target` only when it is our own export of weights with this file name."""
    if not target.exists() and not target.is_symlink():
        return
    meta = existing_export_metadata(target)
    if meta.get("exporter") == EXPORTER and meta.get("weights") == weights.name:
        LOGGER.info(f"{target} is a previous export of {weights.name}; it will be replaced")
        return
    raise FileExistsError(
        f"{target} exists and is not this project's export of {weights.name}; refusing to overwrite it. "
        f"Move or delete it, or copy {weights.name} to another folder and export from there."
    )


def compare_outputs(reference: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """(max abs diff, relative diff) of two (B, N, 5 + nc) outputs.

    relative diff = max(box diff / largest |box value|, score diff); scores lie in [0, 1], so their
    absolute difference is already relative to their scale. NaN or inf counts as an infinite error.
    A shape mismatch raises ExportError.
    """
    if tuple(output.shape) != tuple(reference.shape):
        raise ExportError(f"output shape {tuple(output.shape)} differs from PyTorch's "
                          f"{tuple(reference.shape)}")
    reference, output = reference.float().cpu(), output.float().cpu()
    diff = torch.nan_to_num((output - reference).abs(), nan=float("inf"))
    box_scale = reference[..., :4].abs().max().clamp(min=1.0)
    relative = max(float(diff[..., :4].max() / box_scale), float(diff[..., 4:].max()))
    return float(diff.max()), relative


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sample(shape: Sequence[int], device: torch.device, half: bool) -> torch.Tensor:
    """Seeded uniform [0, 1) images: the same sample for every format and every run."""
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    x = torch.rand(tuple(shape), generator=generator).to(device)
    return x.half() if half else x


@contextlib.contextmanager
def _quiet_tracing():
    """Silence the tracer's and the deprecated exporters' warnings; verification is the real check."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield


# -- the model to export ------------------------------------------------------------------------------
def load_export_model(weights: Path, device: torch.device, half: bool):
    """Our checkpoint as a fused, frozen DetectionModel that returns only the decoded tensor."""
    from engine.checkpoint import load_detection_model

    model = load_detection_model(weights, device, fuse=False)
    with torch.no_grad():  # folding must not record autograd history into the new weights
        model.fuse()
    model.model[-1].export = True  # the instance attribute; other models keep returning (decoded, maps)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.half() if half else model.float()


def export_metadata(model, weights: Path, shape: Sequence[int], dynamic: bool, half: bool) -> dict[str, Any]:
    return {
        "exporter": EXPORTER,
        "stride": int(max(model.stride)),
        "names": [str(n) for n in model.names],
        "nc": int(model.nc),
        "shape": [int(s) for s in shape],
        "dynamic": bool(dynamic),
        "half": bool(half),
        "precision": "fp16" if half else "fp32",
        "weights": weights.name,
        "weights_sha256": _sha256(weights),
    }


# -- writers: each writes `tmp` (not the final path) ---------------------------------------------------
def write_torchscript(model, sample: torch.Tensor, tmp: Path, meta: dict[str, Any]) -> None:
    """Trace the model on `sample` and save it with the metadata as extra/config.txt (JSON)."""
    with _quiet_tracing():
        # check_trace=False: the tracer's own re-run is redundant with the verification below
        traced = torch.jit.trace(model, sample, strict=False, check_trace=False)
    traced.save(str(tmp), _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta)})


def write_onnx(model, sample: torch.Tensor, tmp: Path, meta: dict[str, Any], opset: int, dynamic: bool,
               simplify: bool) -> None:
    """TorchScript-based ONNX export (input 'images', output 'output0'), checked, optionally slimmed,
    with the metadata in metadata_props."""
    import onnx

    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    with _quiet_tracing():
        torch.onnx.export(model, (sample,), str(tmp), opset_version=opset, input_names=["images"],
                          output_names=["output0"], dynamic_axes=axes if dynamic else None,
                          do_constant_folding=True, dynamo=False)
    model_onnx = onnx.load(str(tmp))
    onnx.checker.check_model(model_onnx)
    if simplify:
        model_onnx = _slim(model_onnx)
    del model_onnx.metadata_props[:]
    for key, value in meta.items():
        model_onnx.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(model_onnx, str(tmp))


def _slim(model_onnx):
    try:
        import onnxslim
    except ImportError:
        LOGGER.warning("--simplify: onnxslim is not installed (pip install onnxslim); exporting unsimplified")
        return model_onnx
    LOGGER.info(f"simplifying with onnxslim {getattr(onnxslim, '__version__', '')}")
    return onnxslim.slim(model_onnx)


def write_openvino(model, sample: torch.Tensor, tmp_dir: Path, meta: dict[str, Any], opset: int,
                   dynamic: bool, stem: str) -> None:
    """OpenVINO IR (<stem>.xml/.bin) converted from an ONNX export, plus metadata.yaml."""
    onnx_file = temp_name_beside(tmp_dir / f"{stem}.onnx", keep_suffix=True)
    try:
        write_onnx(model, sample, onnx_file, meta, opset, dynamic, simplify=False)
        write_openvino_from_onnx(onnx_file, tmp_dir, meta, stem)
    finally:
        onnx_file.unlink(missing_ok=True)


def write_openvino_from_onnx(onnx_file: Path, tmp_dir: Path, meta: dict[str, Any], stem: str) -> None:
    """Convert an ONNX file (float, or INT8 QDQ: OpenVINO runs its quantised ops in int8) into
    <stem>.xml/.bin in `tmp_dir`, with metadata.yaml (`meta` plus imgsz and batch)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_file)), str(tmp_dir / f"{stem}.xml"), compress_to_fp16=False)
    shape = meta["shape"]
    ov_meta = {**meta, "imgsz": [int(shape[2]), int(shape[3])], "batch": int(shape[0])}
    (tmp_dir / "metadata.yaml").write_text(yaml.safe_dump(ov_meta, sort_keys=False))


# -- verification -------------------------------------------------------------------------------------
def verify(fmt: str, run: Callable[[torch.Tensor], torch.Tensor],
           cases: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[Verification]:
    """Run the export on each (sample, PyTorch output) case; raise ExportError above the tolerance."""
    checks = []
    for sample, reference in cases:
        output = run(sample)
        try:
            max_abs, relative = compare_outputs(reference, output)
        except ExportError as err:
            raise ExportError(f"{fmt} export failed verification on input {tuple(sample.shape)}: "
                              f"{err}") from err
        checks.append(Verification(tuple(sample.shape), max_abs, relative))
        LOGGER.info(f"{fmt}: verified on input {tuple(sample.shape)}: max abs diff {max_abs:.3g}, "
                    f"relative {relative:.3g} (tolerance {RELATIVE_TOLERANCE:g})")
        if not relative <= RELATIVE_TOLERANCE:
            raise ExportError(
                f"{fmt} export failed verification on input {tuple(sample.shape)}: "
                f"max abs diff {max_abs:.3g}, "
                f"relative diff {relative:.3g} > tolerance {RELATIVE_TOLERANCE:g} (its output differs from "
                f"the PyTorch model's)"
            )
    return checks


def _verification_cases(model, shape: Sequence[int], dynamic: bool, device: torch.device, half: bool):
    """(sample, reference) at the export shape, plus a larger batch and size when dynamic."""
    shapes = [tuple(shape)]
    if dynamic:
        stride = int(max(model.stride))
        b, c, h, w = shape
        shapes.append((b + 1, c, h + stride, w + 2 * stride))
    cases = []
    with torch.no_grad():
        for s in shapes:
            sample = _sample(s, device, half)
            cases.append((sample, model(sample).detach()))
    return cases


def _export_file(fmt: str, target: Path, write: Callable[[Path], None], run_file: Callable[[Path], Callable],
                 cases) -> ExportResult:
    """Write to a temp file, verify it, then rename it over `target`; the temp file never survives."""
    return _export_atomically(fmt, target, atomic_path(target, keep_suffix=True), write, run_file, cases)


def _export_dir(fmt: str, target: Path, write: Callable[[Path], None], run_dir: Callable[[Path], Callable],
                cases) -> ExportResult:
    """As _export_file for a folder (check_overwrite already confirmed a previous one is our export)."""
    return _export_atomically(fmt, target, atomic_dir(target), write, run_dir, cases)


def _export_atomically(fmt: str, target: Path, temp, write, run, cases) -> ExportResult:
    try:
        with temp as tmp:
            write(tmp)
            checks = verify(fmt, run(tmp), cases)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"{fmt} export of {target.name} failed: {type(err).__name__}: {err}") from err
    return ExportResult(target, checks)


# -- entry points -------------------------------------------------------------------------------------
def _check_request(weights: Path, include: Sequence[str], device: torch.device, half: bool,
                   dynamic: bool, int8: bool = False, data=None) -> list[str]:
    if weights.suffix != ".pt":
        raise ValueError(f"--weights {weights}: export starts from one of our .pt checkpoints")
    if not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights}")
    formats = [f.lower() for f in include]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--include {' '.join(include)}: unknown or no format; "
                         f"choose from {', '.join(FORMATS)}")
    if half and device.type != "cuda":
        raise ValueError("--half exports float16 models and needs a CUDA --device (e.g. --device 0)")
    if half and dynamic:
        raise ValueError("--half and --dynamic cannot be combined (as in YOLOv5); drop one of them")
    if int8:
        if "onnx" not in formats:
            raise ValueError("--int8 quantises the ONNX export; add onnx to --include")
        if half:
            raise ValueError("--int8 and --half cannot be combined; INT8 is quantised from float32")
        if not data:
            raise ValueError("--int8 needs --data DATASET.yaml: its train split calibrates the quantisation "
                             "and its val split checks the mAP")
    if "openvino" in formats:
        if half:
            raise ValueError("--half is for CUDA formats; OpenVINO is exported in float32")
        try:
            import openvino  # noqa: F401
        except ImportError as err:
            raise ValueError("--include openvino needs the openvino package (pip install openvino)") from err
    return list(dict.fromkeys(formats))


def export_and_verify(weights: str | Path, include: Sequence[str] = ("torchscript", "onnx"),
                      imgsz: int | Sequence[int] = (640, 640), batch_size: int = 1, dynamic: bool = False,
                      opset: int | None = None, simplify: bool = False, half: bool = False,
                      device: str | torch.device = "cpu", int8: bool = False, data: str | Path | None = None,
                      calib: int | None = None, int8_tolerance: float | None = None,
                      workers: int = 0, int8_ops: str = "auto") -> dict[str, ExportResult]:
    """Export `weights` to each format in `include` and verify each; returns {format: ExportResult}.

    imgsz: (height, width) or one side, rounded up to a multiple of the stride; batch_size: the
    exported batch (any batch works with `dynamic`). int8 (needs 'onnx' in include and `data`): also
    write `<stem>_int8.onnx`, calibrated on `calib` train images (default 100) and accepted only if its
    val mAP50-95 is at most `int8_tolerance` (default 0.01) below the float ONNX model's; its result is
    under the key 'onnx_int8' (and its OpenVINO IR under 'openvino_int8' when 'openvino' is included,
    gated the same way). int8_ops: 'auto' (default: 'full', else 'conv' when 'full' fails the
    gate), 'full' or 'conv' (see engine.quantize). Raises ExportError (failed or wrong export, or too
    large an INT8 drop), FileExistsError (would overwrite a file that is not our export), ValueError
    (bad request).
    """
    from engine.quantize import DEFAULT_CALIB_IMAGES, DEFAULT_INT8_TOLERANCE

    weights, device = Path(weights), select_device(device)
    formats = _check_request(weights, include, device, half, dynamic, int8, data)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    if int8 and int8_ops not in INT8_OPS:
        raise ValueError(f"--int8-ops {int8_ops}: expected one of {', '.join(INT8_OPS)}")
    targets = {fmt: target_path(weights, fmt) for fmt in formats + _int8_formats(formats, int8)}
    for target in targets.values():
        check_overwrite(target, weights)  # before any work, so a refusal leaves nothing half done
    model = load_export_model(weights, device, half)
    stride = int(max(model.stride))
    shape = (batch_size, 3, *check_img_size(imgsz, stride))
    cases = _verification_cases(model, shape, dynamic, device, half)
    sample, reference = cases[0]
    meta = export_metadata(model, weights, shape, dynamic, half)
    opset = opset or DEFAULT_OPSET
    LOGGER.info(f"PyTorch: starting from {weights} with output shape {tuple(reference.shape)} "
                f"({weights.stat().st_size / 1e6:.1f} MB)")

    writers = {  # each writes one format to a temporary path
        "torchscript": lambda p: write_torchscript(model, sample, p, meta),
        "onnx": lambda p: write_onnx(model, sample, p, meta, opset, dynamic, simplify),
        "openvino": lambda d: write_openvino(model, sample, d, meta, opset, dynamic, weights.stem),
    }
    run_file = partial(InferenceBackend, device=device, fp16=half)
    results = {}
    for fmt in formats:
        export = _export_dir if fmt == "openvino" else _export_file
        results[fmt] = export(fmt, targets[fmt], writers[fmt], run_file, cases)
        path = results[fmt].path
        LOGGER.info(f"{fmt}: export success, saved as {path} ({_size_mb(path):.1f} MB)")
    if int8:
        head_prefix = f"/model.{len(model.model) - 1}/"
        tolerance = DEFAULT_INT8_TOLERANCE if int8_tolerance is None else int8_tolerance
        results["onnx_int8"] = export_int8(results["onnx"].path, targets["onnx_int8"], data, shape, stride,
                                           head_prefix, calib or DEFAULT_CALIB_IMAGES, tolerance, cases,
                                           workers, int8_ops)
        if "openvino_int8" in targets:
            results["openvino_int8"] = export_openvino_int8(results["onnx_int8"], targets["openvino_int8"],
                                                            weights.stem, cases, (data, tolerance, workers))
    return results


def _int8_formats(formats: Sequence[str], int8: bool) -> list[str]:
    """The INT8 outputs of a request: the QDQ ONNX file, and its OpenVINO IR when openvino is included."""
    if not int8:
        return []
    return ["onnx_int8"] + (["openvino_int8"] if "openvino" in formats else [])


def export_int8(float_onnx: Path, target: Path, data, shape: Sequence[int], stride: int, head_prefix: str,
                calib: int, tolerance: float, cases, workers: int = 0, ops: str = "auto") -> ExportResult:
    """Quantise `float_onnx` into `target` (see engine.quantize) and accept it only if its val mAP50-95
    drop is within `tolerance`; the file appears only once accepted. ops 'auto' tries 'full' (fastest)
    and falls back to 'conv' when 'full' fails the gate."""
    from engine import quantize

    choices = ["full", "conv"] if ops == "auto" else [ops]
    files = quantize.calibration_files(data, calib)
    LOGGER.info(f"INT8: calibrating on {len(files)} images of the train split of {data}, letterboxed to "
                f"{shape[2]}x{shape[3]}")
    batches = quantize.calibration_batches(files, shape, stride)
    imgsz, batch = max(shape[2], shape[3]), shape[0]
    map_float = quantize.val_map(float_onnx, data, imgsz, batch, workers)
    failures = []
    for choice in choices:
        try:
            return _quantise_and_gate(float_onnx, target, batches, head_prefix, choice, cases, map_float,
                                      (data, imgsz, batch, workers, tolerance), len(files))
        except ValueError as err:
            failures.append(f"ops '{choice}': {err}")
            if choice != choices[-1]:
                LOGGER.warning(f"INT8 with ops '{choice}' failed the accuracy gate ({err}); trying ops "
                               f"'{choices[-1]}' (only convolutions and linear layers quantised)")
    raise ExportError(f"onnx_int8 export of {target.name} failed: {'; '.join(failures)}")


def _quantise_and_gate(float_onnx: Path, target: Path, batches, head_prefix: str, ops: str, cases,
                       map_float: float, val_args, n_calib: int) -> ExportResult:
    """One quantisation of `float_onnx` with `ops`, written to `target` only if it passes the gate."""
    from engine import quantize

    data, imgsz, batch, workers, tolerance = val_args
    extra = {"int8": {"calibration_images": n_calib, "data": Path(str(data)).name}}
    with atomic_path(target, keep_suffix=True) as tmp:
        kept = quantize.quantize_onnx_int8(float_onnx, tmp, batches, head_prefix, extra, ops=ops)
        checks = _int8_output_checks("onnx_int8", InferenceBackend(tmp), cases)
        map_int8 = quantize.val_map(tmp, data, imgsz, batch, workers)
        drop = quantize.check_int8_accuracy(map_float, map_int8, tolerance)
    LOGGER.info(f"onnx_int8: export success, saved as {target} ({_size_mb(target):.1f} MB; ops '{ops}', "
                f"{len(kept)} nodes kept float32)")
    metrics = {"map_float": map_float, "map_int8": map_int8, "drop": drop, "ops": ops}
    return ExportResult(target, checks, metrics)


def export_openvino_int8(onnx_int8: ExportResult, target: Path, stem: str, cases, gate_args) -> ExportResult:
    """The accepted INT8 ONNX file converted to an OpenVINO IR (`<stem>_int8_openvino_model/`; OpenVINO
    runs its quantise/dequantise pairs as int8 ops), accepted only if its own val mAP50-95 is within the
    tolerance of the float ONNX model's (the same gate as the ONNX file: the two runtimes fuse and round
    differently)."""
    from engine import quantize

    data, tolerance, workers = gate_args
    meta = read_onnx_metadata(onnx_int8.path)
    imgsz, batch = max(meta["shape"][2:]), meta["shape"][0]
    map_float = onnx_int8.metrics["map_float"]
    with atomic_dir(target) as tmp:
        try:
            write_openvino_from_onnx(onnx_int8.path, tmp, meta, f"{stem}_int8")
        except Exception as err:
            raise ExportError(f"openvino_int8 export of {target.name} failed: {type(err).__name__}: "
                              f"{err}") from err
        checks = _int8_output_checks("openvino_int8", InferenceBackend(tmp), cases)
        map_int8 = quantize.val_map(tmp, data, imgsz, batch, workers)
        try:
            drop = quantize.check_int8_accuracy(map_float, map_int8, tolerance)
        except ValueError as err:
            raise ExportError(f"openvino_int8 export of {target.name} failed: {err}") from err
    LOGGER.info(f"openvino_int8: export success, saved as {target} ({_size_mb(target):.1f} MB)")
    metrics = {"map_float": map_float, "map_int8": map_int8, "drop": drop, "ops": onnx_int8.metrics["ops"]}
    return ExportResult(target, checks, metrics)


def _int8_output_checks(fmt: str, backend, cases) -> list[Verification]:
    """How far an INT8 model's outputs are from PyTorch's, logged; not a pass/fail check (INT8 is
    judged by its mAP)."""
    checks = []
    for sample, reference in cases:
        max_abs, relative = compare_outputs(reference, backend(sample))
        checks.append(Verification(tuple(sample.shape), max_abs, relative))
        LOGGER.info(f"{fmt}: output on input {tuple(sample.shape)} differs from PyTorch's by max "
                    f"abs {max_abs:.3g}, relative {relative:.3g} (judged by mAP below)")
    return checks


def export_model(weights: str | Path, include: Sequence[str] = ("torchscript", "onnx"),
                 imgsz: int | Sequence[int] = (640, 640), batch_size: int = 1, dynamic: bool = False,
                 opset: int | None = None, simplify: bool = False, half: bool = False,
                 device: str | torch.device = "cpu", **int8_options) -> dict[str, Path]:
    """Export and verify (see export_and_verify, whose int8 options pass through); returns
    {format: path of the exported file}."""
    results = export_and_verify(weights, include, imgsz, batch_size, dynamic, opset, simplify, half, device,
                                **int8_options)
    return {fmt: result.path for fmt, result in results.items()}


def _size_mb(path: Path) -> float:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6
