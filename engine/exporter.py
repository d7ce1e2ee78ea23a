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

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine import formats
from engine.backend import InferenceBackend, check_img_size
from engine.formats import WriteOptions
from engine.formats.int8 import Calibration, ExportError, ExportResult, Int8Job, Verification, size_mb
from engine.formats.onnx import INT8_OPS, write_onnx  # noqa: F401 (re-exported for export.py and tests)
from engine.formats.openvino import DEFAULT_OPENVINO_INT8, OPENVINO_INT8_METHODS  # noqa: F401 (export.py)
from utils.files import atomic_dir, atomic_path
from utils.torch_utils import select_device

LOGGER = logging.getLogger(f"vitdet.{__name__}")

EXPORTER = "vitdet"  # written into every export; marks files this project may overwrite
FORMATS = formats.exportable()  # export.py --include: ('torchscript', 'onnx', 'openvino')
DEFAULT_OPSET = 17
RELATIVE_TOLERANCE = 1e-3
SAMPLE_SEED = 0
DEFAULT_INCLUDE = ("torchscript", "onnx")  # export.py without --include (and without --int8)
PICK_RUNS, PICK_WARMUP = 20, 3  # timing of the accepted INT8 files when there are several
FLOAT_REFERENCE = "float32"  # the float ONNX file's label in the INT8 pick's timing rounds


@dataclass
class ExportOptions:
    """What to export and how (export.py's flags).

    include: formats ('torchscript', 'onnx', 'openvino'); None: DEFAULT_INCLUDE, or with `int8` every
    installed format with an INT8 model ('onnx' and 'openvino'): each INT8 flavour is then tried, one
    refused by its gate is reported and skipped, and the accepted ones are timed here and the fastest is
    named (ExportResult.metrics 'latency_ms' and 'fastest'; the float ONNX file is timed beside them and a
    warning says when it beats them all); with explicit formats a refusal fails the export.
    imgsz: (height, width) or one side, rounded up to a multiple of the stride; batch_size: the exported
    batch (any batch works with `dynamic`);
    opset: ONNX opset (default DEFAULT_OPSET); simplify: onnxslim; half: float16 (CUDA only).
    int8 (needs `data`): also write INT8 models, accepted only if their val mAP50-95 is at most
    `int8_tolerance` (default 0.01) below their float model's: `<stem>_int8.onnx` (ONNX Runtime QDQ,
    with 'onnx' included; `int8_ops` 'auto', 'full' or 'conv', see engine.quantize) and
    `<stem>_int8_openvino_model/` (with 'openvino' included; `openvino_int8` 'nncf' quantises the float
    IR with NNCF using `int8_preset`, 'qdq' converts the INT8 ONNX file). calib: calibration images
    from the train split (default 100); workers: dataloader workers of the gate's validation.
    """

    include: Sequence[str] | None = None
    imgsz: int | Sequence[int] = (640, 640)
    batch_size: int = 1
    dynamic: bool = False
    opset: int | None = None
    simplify: bool = False
    half: bool = False
    device: str | torch.device = "cpu"
    int8: bool = False
    data: str | Path | dict | None = None
    calib: int | None = None
    int8_tolerance: float | None = None
    workers: int = 0
    int8_ops: str = "auto"
    openvino_int8: str = DEFAULT_OPENVINO_INT8
    int8_preset: str = "mixed"


# -- small helpers --------------------------------------------------------------------------------------
def target_path(weights: Path, fmt: str) -> Path:
    """Where `fmt` (a registry name, or '<name>_int8' for its INT8 model) is written for `weights`:
    best.pt -> best.torchscript / best.onnx / best_openvino_model / best_int8.onnx / ..."""
    name, int8 = (fmt[: -len("_int8")], True) if fmt.endswith("_int8") else (fmt, False)
    return formats.get(name).target(weights, int8)


def existing_export_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an existing export at `path` ({} when it has none or cannot be read as one)."""
    fmt = formats.format_of(path)
    if fmt is None or not fmt.capabilities.exportable:
        return {}
    try:
        return fmt.read_metadata(path)
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
def _check_request(weights: Path, opt: ExportOptions, device: torch.device) -> list[str]:
    if weights.suffix != ".pt":
        raise ValueError(f"--weights {weights}: export starts from one of our .pt checkpoints")
    if not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights}")
    requested = [f.lower() for f in opt.include] if opt.include is not None else _default_include(opt)
    unknown = [f for f in requested if f not in FORMATS]
    if unknown or not requested:
        raise ValueError(f"--include {' '.join(opt.include or ())}: unknown or no format; "
                         f"choose from {', '.join(FORMATS)}")
    if opt.half and device.type != "cuda":
        raise ValueError("--half exports float16 models and needs a CUDA --device (e.g. --device 0)")
    if opt.half and opt.dynamic:
        raise ValueError("--half and --dynamic cannot be combined (as in YOLOv5); drop one of them")
    if opt.batch_size < 1:
        raise ValueError(f"--batch-size {opt.batch_size}: must be >= 1")
    requested = list(dict.fromkeys(requested))
    for name in requested:
        formats.get(name).check_request(opt, requested)
    if opt.int8:
        _check_int8_request(opt, requested)
    return requested


def _default_include(opt: ExportOptions) -> list[str]:
    """The formats of a request without --include: DEFAULT_INCLUDE, or with --int8 every INT8 format
    whose runtime is installed (so that every INT8 flavour can be tried and the fastest named)."""
    if not opt.int8:
        return list(DEFAULT_INCLUDE)
    usable = []
    for name in formats.int8_formats():
        try:
            formats.get(name).check_request(opt, [name])
        except ValueError as err:
            LOGGER.info(f"--int8 without --include: no {name} INT8 model ({err})")
            continue
        usable.append(name)
    LOGGER.info(f"--int8 without --include: exporting {' and '.join(usable)} with their INT8 models; a "
                "flavour refused by the accuracy gate is skipped, and the accepted ones are timed to name "
                "the fastest on this machine")
    return usable


def _check_dynamic_exportable(model: torch.nn.Module, weights: Path) -> None:
    """Refuse --dynamic, before any file is written, for a model with a node that declares
    (`static_export_only()`) that its graph cannot follow other input sizes."""
    for module in model.modules():
        reason = module.static_export_only() if hasattr(module, "static_export_only") else None
        if reason:
            raise ValueError(f"--dynamic: {weights}: {reason}; export it at a fixed size (--imgsz H W, "
                             "without --dynamic)")


def _check_int8_request(opt: ExportOptions, requested: Sequence[str]) -> None:
    quantizable = [name for name in requested if name in formats.int8_formats()]
    if not quantizable:
        raise ValueError(f"--int8 writes INT8 models of {' and '.join(formats.int8_formats())} exports; "
                         f"add {' or '.join(formats.int8_formats())} to --include")
    if opt.half:
        raise ValueError("--int8 and --half cannot be combined; INT8 is quantised from float32")
    if not opt.data:
        raise ValueError("--int8 needs --data DATASET.yaml: its train split calibrates the quantisation "
                         "and its val split checks the mAP")
    for name in quantizable:
        formats.get(name).check_int8_request(opt, requested)


def export_and_verify(weights: str | Path, options: ExportOptions | None = None,
                      **fields) -> dict[str, ExportResult]:
    """Export `weights` to each format of `options` (an ExportOptions, or its fields as keywords) and
    verify each; returns {format: ExportResult}, INT8 results under 'onnx_int8' and 'openvino_int8'.

    Raises ExportError (failed or wrong export, or too large an INT8 drop), FileExistsError (would
    overwrite a file that is not our export), ValueError (bad request).
    """
    opt = replace(options, **fields) if options is not None else ExportOptions(**fields)
    weights, device = Path(weights), select_device(opt.device)
    names = _check_request(weights, opt, device)
    targets = {fmt: target_path(weights, fmt) for fmt in names + _int8_formats(names, opt.int8)}
    for target in targets.values():
        check_overwrite(target, weights)  # before any work, so a refusal leaves nothing half done
    model = load_export_model(weights, device, opt.half)
    if opt.dynamic:
        _check_dynamic_exportable(model, weights)
    stride = int(max(model.stride))
    shape = (opt.batch_size, 3, *check_img_size(opt.imgsz, stride))
    cases = _verification_cases(model, shape, opt.dynamic, device, opt.half)
    sample, reference = cases[0]
    meta = export_metadata(model, weights, shape, opt.dynamic, opt.half)
    opset = opt.opset or DEFAULT_OPSET
    LOGGER.info(f"PyTorch: starting from {weights} with output shape {tuple(reference.shape)} "
                f"({weights.stat().st_size / 1e6:.1f} MB)")

    write_options = WriteOptions(opset, opt.dynamic, opt.simplify, weights.stem)
    run_file = partial(InferenceBackend, device=device, fp16=opt.half)
    results = {}
    for fmt in names:
        format_ = formats.get(fmt)
        export = _export_dir if format_.is_dir else _export_file
        write = partial(format_.write, model, sample, meta=meta, options=write_options)
        results[fmt] = export(fmt, targets[fmt], write, run_file, cases)
        path = results[fmt].path
        LOGGER.info(f"{fmt}: export success, saved as {path} ({size_mb(path):.1f} MB)")
    if opt.int8:
        calibration = Calibration.load(opt.data, opt.calib, opt.int8_tolerance, opt.workers, shape, stride)
        job = Int8Job(opt, calibration, f"/model.{len(model.model) - 1}/", weights.stem,
                      partial(_int8_output_checks, cases=cases))
        int8 = _export_int8_all(results, targets, job, skip_refused=opt.include is None)
        results.update(int8)
        if len(int8) > 1:
            name_fastest_int8(int8, max(shape[2:]), results.get("onnx"))
    return results


def _export_int8_all(results: dict[str, ExportResult], targets: dict[str, Path], job: Int8Job,
                     skip_refused: bool = False) -> dict[str, ExportResult]:
    """Each requested format's INT8 model, in registry order (its Format.quantize). skip_refused (--int8
    without --include): a flavour that fails is logged and skipped; ExportError only when all fail."""
    refused = []
    for name in formats.int8_formats():
        key = f"{name}_int8"
        if key not in targets:
            continue
        try:
            job.done[key] = formats.get(name).quantize(results[name], targets[key], job)
        except ExportError as err:
            if not skip_refused:
                raise
            LOGGER.warning(f"{key}: no INT8 model of this flavour ({err}); going on with the others")
            refused.append(str(err))
    if refused and not job.done:
        raise ExportError(f"no INT8 flavour passed: {'; '.join(refused)}")
    return job.done


def name_fastest_int8(int8: dict[str, ExportResult], imgsz: int,
                      float_file: ExportResult | None = None) -> str:
    """Time the accepted INT8 files `int8` ({'<format>_int8': result}) here (batch 1, PICK_RUNS alternating
    rounds through the runners detect.py uses), record 'latency_ms' in each one's metrics and 'fastest' in
    the fastest's; log and return its key. Which INT8 runtime wins depends on the model and the CPU
    (docs/deployment.md). `float_file` (the float32 ONNX export) is timed in the same rounds as a
    reference: without VNNI some models run slower in INT8 than in float32, and the log says so."""
    from engine.latency import alternating_latency

    files = {key: r.path for key, r in int8.items()}
    if float_file is not None:
        files[FLOAT_REFERENCE] = float_file.path
    rows = alternating_latency(files, imgsz, PICK_RUNS, PICK_WARMUP)
    latency = {row["file"]: row["median_ms"] for row in rows}
    for key, result in int8.items():
        result.metrics["latency_ms"] = latency[key]
    fastest = min(int8, key=latency.__getitem__)
    int8[fastest].metrics["fastest"] = True
    timings = ", ".join(f"{Path(r['path']).name} {r['median_ms']:.1f} ms" for r in rows if r["file"] in int8)
    LOGGER.info(f"INT8 files timed on this machine (batch 1, {rows[0]['input']}, median of {PICK_RUNS} "
                f"alternating runs): {timings}. Fastest: {int8[fastest].path} -- deploy it with "
                f"python detect.py --weights {int8[fastest].path}")
    if float_file is not None:
        float_file.metrics["latency_ms"] = float_ms = latency[FLOAT_REFERENCE]
        if float_ms < latency[fastest]:
            LOGGER.warning(f"INT8 does not pay off for this model on this CPU: the float32 {float_file.path} "
                           f"ran {float_ms:.1f} ms in the same rounds, faster than every INT8 file (CPUs "
                           f"without VNNI gain little from INT8); deploy it with python detect.py --weights "
                           f"{float_file.path}")
    busy = busy_machine()
    if busy:
        LOGGER.warning(f"INT8 timing: {busy}; runtimes suffer unequally from shared cores, so time the files "
                       f"again on a quiet machine: python benchmarks.py --files "
                       f"{' '.join(str(r.path) for r in int8.values())}")
    return fastest


def busy_machine() -> str:
    """'' or why timings taken now are doubtful: more runnable tasks (1-minute load average) than cores
    (our own inference threads count at most as many as there are cores)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return f"the machine was busy (load {load:.1f} on {cores} cores)" if load > cores else ""


def _int8_formats(requested: Sequence[str], int8: bool) -> list[str]:
    """The INT8 outputs of a request: the QDQ ONNX file with onnx, the INT8 IR with openvino."""
    if not int8:
        return []
    return [f"{fmt}_int8" for fmt in formats.int8_formats() if fmt in requested]


def _int8_output_checks(fmt: str, path: Path, cases) -> list[Verification]:
    """How far the INT8 model at `path` is from PyTorch's outputs, logged; not a pass/fail check (INT8
    is judged by its mAP)."""
    backend = InferenceBackend(path)
    checks = []
    for sample, reference in cases:
        max_abs, relative = compare_outputs(reference, backend(sample))
        checks.append(Verification(tuple(sample.shape), max_abs, relative))
        LOGGER.info(f"{fmt}: output on input {tuple(sample.shape)} differs from PyTorch's by max "
                    f"abs {max_abs:.3g}, relative {relative:.3g} (judged by mAP below)")
    return checks


def export_model(weights: str | Path, options: ExportOptions | None = None, **fields) -> dict[str, Path]:
    """Export and verify (see export_and_verify); returns {format: path of the exported file}."""
    return {fmt: result.path for fmt, result in export_and_verify(weights, options, **fields).items()}
