"""ONNX (`.onnx`), run by ONNX Runtime: float32/float16 exports and export.py --int8's QDQ file
(`<stem>_int8.onnx`, quantised by engine.quantize, gated here). Metadata: JSON values in
`metadata_props`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from engine.formats.base import (
    Capabilities,
    Format,
    RunOptions,
    WriteOptions,
    decode_metadata,
    names_from_metadata,
    stride_from_metadata,
)
from engine.formats.int8 import LOGGER as EXPORT_LOG  # INT8 writers log as the exporter
from engine.formats.int8 import ExportError, ExportResult, Int8Job, size_mb
from engine.formats.torchscript import quiet_tracing

LOGGER = logging.getLogger("vitdet.engine.backend")


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded `metadata_props` of an ONNX file ({} when it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return decode_metadata({p.key: p.value for p in model.metadata_props})


def write_onnx(model, sample: torch.Tensor, tmp: Path, meta: dict[str, Any], opset: int, dynamic: bool,
               simplify: bool) -> None:
    """TorchScript-based ONNX export (input 'images', output 'output0'), checked, optionally slimmed,
    with the metadata in metadata_props."""
    import onnx

    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    with quiet_tracing():
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


class OnnxRunner:
    """An ONNX file run by onnxruntime (CUDA provider when the device is CUDA and ORT offers it)."""

    def __init__(self, path: Path, device: torch.device, fp16: bool):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        elif device.type == "cuda":
            LOGGER.warning("onnxruntime has no CUDA provider here; running the ONNX model on the CPU")
        self.model = self.session = ort.InferenceSession(str(path), providers=providers)
        meta = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        model_input, model_output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name = model_input.name
        self.stride = stride_from_metadata(meta, path)
        out_dim = model_output.shape[-1] if model_output.shape else None
        nc = out_dim - 5 if isinstance(out_dim, int) else meta.get("nc")
        self.names = names_from_metadata(meta, nc, path)
        dims = model_input.shape  # ints for fixed axes, strings (or None) for dynamic ones
        self.dynamic = not all(isinstance(d, int) for d in dims)
        self.fixed_shape = None if self.dynamic else (dims[0], dims[2], dims[3])
        self.fp16 = model_input.type == "tensor(float16)"
        if fp16 and not self.fp16:
            LOGGER.warning(f"{path} takes float32 input; fp16 ignored (export with --half for an fp16 model)")
        self.input_dtype = torch.float16 if self.fp16 else torch.float32
        self.precision = str(meta.get("precision") or ("fp16" if self.fp16 else "fp32"))
        _warn_full_range_int8(meta, path)

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: im.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(im.device)


def _warn_full_range_int8(meta: dict[str, Any], path: Path) -> None:
    """An INT8 file quantised with 8-bit weights (on a VNNI CPU) may saturate onnxruntime's 16-bit
    pair sums on a CPU without VNNI: say so, rather than lose accuracy silently."""
    from engine.precision import cpu_has_vnni

    settings = meta.get("int8")
    if isinstance(settings, dict) and settings.get("reduce_range") is False and not cpu_has_vnni():
        LOGGER.warning(f"{path}: INT8 weights use the full 8-bit range (quantised on a CPU with VNNI); "
                       f"this CPU has no VNNI, where onnxruntime's integer kernels can saturate and lose "
                       f"accuracy. Re-export with --int8 on this machine (it then uses 7-bit weights) and "
                       f"check the mAP")


# -- INT8: ONNX Runtime QDQ file (<stem>_int8.onnx) --------------------------------------------------
INT8_OPS = ("auto", "full", "conv")  # --int8-ops (engine.quantize.OP_TYPES; auto: full, then conv)


def export_qdq_int8(float_onnx: Path, target: Path, job: Int8Job) -> ExportResult:
    """Quantise `float_onnx` into `target` (engine.quantize) and accept it only if its val mAP50-95 drop
    is within the tolerance; the file appears only once accepted. --int8-ops 'auto' tries 'full'
    (fastest) and falls back to 'conv' when 'full' fails the gate."""
    ops = job.options.int8_ops
    choices = ["full", "conv"] if ops == "auto" else [ops]
    map_float = job.calibration.val_map(float_onnx)
    failures = []
    for choice in choices:
        try:
            return _quantise_and_gate(float_onnx, target, choice, map_float, job)
        except ValueError as err:
            failures.append(f"ops '{choice}': {err}")
            if choice != choices[-1]:
                EXPORT_LOG.warning(f"INT8 with ops '{choice}' failed the accuracy gate ({err}); trying ops "
                               f"'{choices[-1]}' (only convolutions and linear layers quantised)")
    raise ExportError(f"onnx_int8 export of {target.name} failed: {'; '.join(failures)}")


def _quantise_and_gate(float_onnx: Path, target: Path, ops: str, map_float: float,
                       job: Int8Job) -> ExportResult:
    """One quantisation of `float_onnx` with `ops`, written to `target` only if it passes the gate
    (ValueError, from engine.quantize.check_int8_accuracy, when it does not)."""
    from engine import quantize
    from utils.files import atomic_path

    calibration = job.calibration
    extra = {"int8": {"calibration_images": calibration.images, "data": calibration.data_name}}
    with atomic_path(target, keep_suffix=True) as tmp:
        kept = quantize.quantize_onnx_int8(float_onnx, tmp, calibration.batches, job.head_prefix, extra,
                                           ops=ops)
        checks = job.output_checks("onnx_int8", tmp)
        map_int8 = calibration.val_map(tmp)
        drop = quantize.check_int8_accuracy(map_float, map_int8, calibration.tolerance)
    EXPORT_LOG.info(f"onnx_int8: export success, saved as {target} ({size_mb(target):.1f} MB; ops '{ops}', "
                f"{len(kept)} nodes kept float32)")
    metrics = {"map_float": map_float, "map_int8": map_int8, "drop": drop, "ops": ops, "method": "qdq"}
    return ExportResult(target, checks, metrics)


class OnnxFormat(Format):
    name, suffix = "onnx", ".onnx"
    capabilities = Capabilities(dynamic=True, bf16=False, int8=True, batch=True)

    def check_int8_request(self, options, requested) -> None:
        if options.int8_ops not in INT8_OPS:
            raise ValueError(f"--int8-ops {options.int8_ops}: expected one of {', '.join(INT8_OPS)}")

    def quantize(self, float_result: ExportResult, target: Path, job: Int8Job) -> ExportResult:
        return export_qdq_int8(float_result.path, target, job)

    def read_metadata(self, path: Path) -> dict[str, Any]:
        return read_onnx_metadata(path)

    def write(self, model, sample: torch.Tensor, tmp: Path, meta: dict[str, Any],
              options: WriteOptions) -> None:
        write_onnx(model, sample, tmp, meta, options.opset, options.dynamic, options.simplify)

    def runner(self, path: Path, device: torch.device, options: RunOptions) -> OnnxRunner:
        return OnnxRunner(path, device, options.fp16)


FORMAT = OnnxFormat()
