"""One inference front for detect.py and val.py: our checkpoints, TorchScript, ONNX (float or INT8)
and OpenVINO exports alike.

    backend = InferenceBackend("runs/train/exp/weights/best.onnx", device="cpu")
    pred = backend(images)          # images: (B, 3, H, W) float in [0, 1], RGB
    # pred: (B, N, 5 + nc) rows [x, y, w, h (pixels of the input), obj, cls scores...]

All kinds give the same decoded rows (what `DetectionModel` returns in eval mode), so NMS and
everything after it never needs to know which file was loaded. Exported files carry their stride and
class names as metadata (ONNX `metadata_props`; TorchScript `_extra_files['config.txt']`, JSON; OpenVINO
`metadata.yaml` beside the IR), written by `engine.exporter`. An INT8 ONNX file (export.py --int8) is
plain ONNX with QuantizeLinear/DequantizeLinear nodes and runs through onnxruntime like any other; its
metadata says `precision: int8`. OpenVINO: pass the `<stem>_openvino_model/` folder (or its .xml); it
runs on OpenVINO's CPU device, with dynamic shapes when it was exported with --dynamic.

bf16=True runs a .pt checkpoint under `torch.autocast('cpu', dtype=torch.bfloat16)` (the Detect
head's output convolutions and box decoding stay float32; outputs are float32). It is refused with a
ValueError on CPUs without native bf16 (see engine.precision) unless allow_emulated_bf16=True (or
VITDET_EMULATED_BF16=1), which measures bf16 accuracy with PyTorch's float32 emulation. For an
OpenVINO model it selects OpenVINO's bf16 inference precision (native bf16 CPUs only); without it
OpenVINO always runs in float32 (OpenVINO's own default on bf16 CPUs would be bf16).

Fixed-shape exports (everything exported without `--dynamic`) only accept their exported height and
width; a batch of another size is run in chunks of the exported batch size (the last chunk padded),
so callers may batch freely.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from utils.torch_utils import select_device

LOGGER = logging.getLogger(f"vitdet.{__name__}")

KINDS = {".pt": "pytorch", ".torchscript": "torchscript", ".onnx": "onnx", ".xml": "openvino"}
OPENVINO_SUFFIX = "_openvino_model"  # export.py --include openvino writes <stem>_openvino_model/
TORCHSCRIPT_METADATA = "config.txt"  # name of the TorchScript extra file holding the JSON metadata
TTA_SCALES = (1.0, 0.83, 0.67)  # YOLOv5's test-time augmentation: scales ...
TTA_FLIPS = (None, 3, None)  # ... and flips (3 = left-right on a (B, C, H, W) tensor)
TTA_PAD_VALUE = 0.447  # grey fill of the padding after down-scaling (YOLOv5's ImageNet-mean value)


# -- metadata of exported files ----------------------------------------------------------------------
def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded `metadata_props` of an ONNX file ({} when it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return _decode_metadata({p.key: p.value for p in model.metadata_props})


def read_torchscript_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored as `extra/config.txt` in a TorchScript archive ({} when absent).

    Read straight from the zip archive, so checking a file never deserialises its code.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_METADATA}")]
            if not names:
                return {}
            text = archive.read(names[0]).decode("utf-8")
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not a TorchScript archive ({err})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: extra/{TORCHSCRIPT_METADATA} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: extra/{TORCHSCRIPT_METADATA} must hold a JSON object, "
                         f"found {type(data).__name__}")
    return data


def openvino_model_files(path: str | Path) -> tuple[Path, Path]:
    """(IR .xml, metadata.yaml) of an OpenVINO export given as its folder or its .xml file."""
    path = Path(path)
    if path.is_dir():
        xmls = sorted(path.glob("*.xml"))
        if len(xmls) != 1:
            raise FileNotFoundError(f"{path}: expected one OpenVINO .xml model in the folder, found "
                                    f"{len(xmls)}")
        return xmls[0], path / "metadata.yaml"
    return path, path.parent / "metadata.yaml"


def read_openvino_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata.yaml beside an OpenVINO IR (folder or .xml); {} when absent."""
    import yaml

    meta_file = openvino_model_files(path)[1]
    if not meta_file.is_file():
        return {}
    meta = yaml.safe_load(meta_file.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: must hold a mapping, found {type(meta).__name__}")
    return meta


def _decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    """ONNX metadata values are strings; ours are JSON. A value that is not JSON is kept as text."""
    decoded = {}
    for key, value in props.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def _names_from_metadata(meta: dict[str, Any], nc: int | None, path: Path) -> list[str]:
    names = meta.get("names")
    if isinstance(names, dict):  # {id: name}, as some YOLOv5 exports write it
        names = [names[k] for k in sorted(names, key=int)]
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    count = nc if nc is not None else 0
    LOGGER.warning(f"{path}: no class names in the file's metadata; using '0'..'{max(count - 1, 0)}'")
    return [str(i) for i in range(count)]


def _stride_from_metadata(meta: dict[str, Any], path: Path) -> int:
    stride = meta.get("stride")
    if isinstance(stride, (list, tuple)):
        stride = max(stride)
    if isinstance(stride, (int, float)) and stride >= 1:
        return int(stride)
    LOGGER.warning(f"{path}: no stride in the file's metadata; assuming 32")
    return 32


# -- image size helpers ------------------------------------------------------------------------------
def check_img_size(imgsz: int | list[int] | tuple[int, ...], stride: int = 32) -> tuple[int, int]:
    """--imgsz (one value or [height, width]) -> (height, width), each rounded up to a multiple of
    `stride` with a warning (YOLOv5's check_img_size)."""
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"--imgsz {imgsz}: expected one or two positive integers (height, width)")
    rounded = tuple(int(math.ceil(s / stride) * stride) for s in sizes)
    if rounded != tuple(sizes):
        LOGGER.warning(f"--imgsz {sizes} is not a multiple of the max stride {stride}; using {list(rounded)}")
    return rounded  # type: ignore[return-value]


def scale_image(im: torch.Tensor, ratio: float, stride: int = 32) -> torch.Tensor:
    """Resize (B, 3, H, W) by `ratio` (bilinear), then pad right/bottom up to multiples of `stride`."""
    if ratio == 1.0:
        return im
    h, w = im.shape[2:]
    new_h, new_w = int(h * ratio), int(w * ratio)
    im = F.interpolate(im, size=(new_h, new_w), mode="bilinear", align_corners=False)
    padded_h, padded_w = (int(math.ceil(s * ratio / stride) * stride) for s in (h, w))
    return F.pad(im, [0, padded_w - new_w, 0, padded_h - new_h], value=TTA_PAD_VALUE)


# -- the runners, one per kind ------------------------------------------------------------------------
class _PyTorchRunner:
    """One of our checkpoints, rebuilt as a DetectionModel (EMA weights when present)."""

    def __init__(self, path: Path, device: torch.device, fp16: bool, fuse: bool, bf16: bool = False):
        from engine.checkpoint import load_detection_model

        model = load_detection_model(path, device, fuse=False)
        if fuse:
            with torch.no_grad():  # folding must not record autograd history into the new weights
                model.fuse()
        self.model = model.half() if fp16 else model.float()
        detect = self.model.model[-1]
        self.strides = [int(s) for s in detect.stride]
        self.anchors_per_cell = int(detect.na)
        self.stride = int(max(self.strides))
        self.names = [str(n) for n in self.model.names]
        self.dynamic, self.fixed_shape, self.fp16, self.bf16 = True, None, fp16, bf16
        self.input_dtype = torch.float16 if fp16 else torch.float32
        self.device_type = device.type
        if bf16:
            keep_float32(detect, device.type)

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(im)
        return out[0] if isinstance(out, (tuple, list)) else out


def keep_float32(module: torch.nn.Module, device_type: str) -> None:
    """Run `module` (the Detect head) in float32 inside a bf16 autocast region: its 1x1 output convs
    and the box decoding (pixel coordinates up to the image size; bf16 would round 600 px to 4 px)."""
    forward = module.forward

    def float_forward(x):
        with torch.autocast(device_type, enabled=False):
            return forward([t.float() for t in x])

    module.forward = float_forward


class _TorchScriptRunner:
    """A TorchScript file written by export.py (or any traced model with the same output)."""

    def __init__(self, path: Path, device: torch.device, fp16: bool):
        meta = read_torchscript_metadata(path)
        with warnings.catch_warnings():  # torch.jit is deprecated upstream; the file format still works
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = torch.jit.load(str(path), map_location=device)
        self.model = (model.half() if fp16 else model.float()).eval()
        self.stride = _stride_from_metadata(meta, path)
        self.names = _names_from_metadata(meta, meta.get("nc"), path)
        self.dynamic = bool(meta.get("dynamic", False))
        self.fixed_shape = None if self.dynamic else _fixed_shape_from_metadata(meta, path)
        self.fp16 = fp16
        self.input_dtype = torch.float16 if fp16 else torch.float32

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        out = self.model(im)
        return out[0] if isinstance(out, (tuple, list)) else out


def _fixed_shape_from_metadata(meta: dict[str, Any], path: Path) -> tuple[int, int, int] | None:
    shape = meta.get("shape")  # [B, 3, H, W] of the export
    if isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) for s in shape):
        return shape[0], shape[2], shape[3]
    LOGGER.warning(f"{path}: no input shape in the metadata; any input size will be tried")
    return None


class _OnnxRunner:
    """An ONNX file run by onnxruntime (CUDA provider when the device is CUDA and ORT offers it)."""

    def __init__(self, path: Path, device: torch.device, fp16: bool):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        elif device.type == "cuda":
            LOGGER.warning("onnxruntime has no CUDA provider here; running the ONNX model on the CPU")
        self.session = ort.InferenceSession(str(path), providers=providers)
        meta = _decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        model_input, model_output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name = model_input.name
        self.stride = _stride_from_metadata(meta, path)
        out_dim = model_output.shape[-1] if model_output.shape else None
        nc = out_dim - 5 if isinstance(out_dim, int) else meta.get("nc")
        self.names = _names_from_metadata(meta, nc, path)
        dims = model_input.shape  # ints for fixed axes, strings (or None) for dynamic ones
        self.dynamic = not all(isinstance(d, int) for d in dims)
        self.fixed_shape = None if self.dynamic else (dims[0], dims[2], dims[3])
        self.fp16 = model_input.type == "tensor(float16)"
        if fp16 and not self.fp16:
            LOGGER.warning(f"{path} takes float32 input; fp16 ignored (export with --half for an fp16 model)")
        self.input_dtype = torch.float16 if self.fp16 else torch.float32
        self.meta_precision = meta.get("precision")
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


class _OpenVINORunner:
    """An OpenVINO IR written by export.py (`<stem>_openvino_model/`), compiled for OpenVINO's CPU device
    in float32, or with bf16=True in OpenVINO's bf16 inference precision. The precision is always set:
    OpenVINO's own default on CPUs with native bf16 (AVX-512 BF16, AMX) is bf16, which would make a
    float32 export silently differ from its model by bf16 rounding."""

    def __init__(self, path: Path, device: torch.device, bf16: bool = False):
        import openvino as ov

        if device.type != "cpu":
            LOGGER.warning(f"{path}: OpenVINO runs on its CPU device here; outputs are moved to {device}")
        xml, _ = openvino_model_files(path)
        meta = read_openvino_metadata(path)
        core = ov.Core()
        model = core.read_model(str(xml))
        hint = "bf16" if bf16 else "f32"
        self.model = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        self.request = self.model.create_infer_request()
        self.stride = _stride_from_metadata(meta, path)
        out_dim = model.output(0).get_partial_shape()[-1]
        nc = out_dim.get_length() - 5 if out_dim.is_static else meta.get("nc")
        self.names = _names_from_metadata(meta, nc, path)
        self.dynamic = model.input(0).get_partial_shape().is_dynamic
        self.fixed_shape = None if self.dynamic else _fixed_shape_from_metadata(meta, path)
        self.fp16, self.input_dtype = False, torch.float32
        self.meta_precision = "bf16" if bf16 else meta.get("precision")

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        self.request.infer({0: im.detach().cpu().float().numpy()})
        out = torch.from_numpy(self.request.get_output_tensor(0).data.copy())
        return out.to(im.device)


def weights_kind(path: Path) -> str | None:
    """'pytorch', 'torchscript', 'onnx' or 'openvino' by the file (or folder) name; None if unknown."""
    if path.name.endswith(OPENVINO_SUFFIX) or (path.is_dir() and any(path.glob("*.xml"))):
        return "openvino"
    return KINDS.get(path.suffix)


def _precision_of(runner, meta_precision: str | None) -> str:
    if getattr(runner, "bf16", False):
        return "bf16"
    if meta_precision:
        return str(meta_precision)
    return "fp16" if runner.fp16 else "fp32"


# -- the front ----------------------------------------------------------------------------------------
class InferenceBackend:
    """Load `.pt` (our checkpoints), `.torchscript`, `.onnx` or OpenVINO (`<stem>_openvino_model/` or
    its `.xml`) weights and run them the same way.

    Args:
        fp16: float16 inference (CUDA only).
        bf16: bfloat16 autocast for a `.pt` checkpoint (Detect head kept float32; outputs float32), or
            OpenVINO's bf16 inference precision for an OpenVINO model (native bf16 CPUs only).
            Refused (ValueError) with any other format, together with fp16, and on a CPU without
            native bf16 (AVX-512 BF16 / AMX) unless `allow_emulated_bf16` (or VITDET_EMULATED_BF16=1,
            .pt only).
        allow_emulated_bf16: run bf16 where the CPU only emulates it (to measure accuracy, not speed).

    Attributes:
        kind: 'pytorch', 'torchscript', 'onnx' or 'openvino'.
        stride: the model's largest stride in pixels (int); input sides must be multiples of it.
        names: class names, index = class id.
        dynamic: True when any input size (multiple of `stride`) and batch work.
        fixed_shape: (B, H, W) the file was exported for, or None when dynamic.
        fp16: True when the model runs in float16 (inputs are converted).
        precision: 'fp32', 'fp16', 'bf16' or 'int8' (an export's metadata `precision`).
        bf16_emulated: True when bf16 runs without native hardware support.
        device: the torch.device the outputs are on.
    """

    def __init__(self, weights: str | Path | list, device: str | torch.device = "cpu", fp16: bool = False,
                 fuse: bool = True, bf16: bool = False, allow_emulated_bf16: bool = False):
        paths = [Path(w) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]
        for path in paths:
            if weights_kind(path) is None:
                raise ValueError(f"weights {path}: unsupported format '{path.suffix}'; expected one of "
                                 f"{', '.join(KINDS)} or a *{OPENVINO_SUFFIX}/ folder (our checkpoints, "
                                 f"TorchScript, ONNX or OpenVINO exports)")
            if not (path.exists() if weights_kind(path) == "openvino" else path.is_file()):
                raise FileNotFoundError(f"weights not found: {path}")
        self.device = select_device(device)
        if fp16 and self.device.type == "cpu":
            raise ValueError("fp16 (--half) needs a CUDA device; float16 inference is not supported on "
                             "the CPU")
        self.weights, self.kind = paths[0], weights_kind(paths[0])
        self.bf16_emulated = bf16 and _check_bf16(paths, self.device, fp16, allow_emulated_bf16)
        self._runners = _make_runners(paths, self.device, fp16, fuse, bf16)
        self._runner = self._runners[0]
        self.stride = max(r.stride for r in self._runners)
        self.names = self._runner.names
        self.dynamic, self.fixed_shape = self._runner.dynamic, self._runner.fixed_shape
        self.fp16 = self._runner.fp16
        self.precision = _precision_of(self._runner, getattr(self._runner, "meta_precision", None))
        what = f"an ensemble of {len(paths)} models" if len(paths) > 1 else self.kind
        how = f", {self.precision}{' (emulated)' if self.bf16_emulated else ''}"
        LOGGER.info(f"Loaded {', '.join(map(str, paths))} ({what}{how}, stride {self.stride}, "
                    f"{len(self.names)} classes, "
                    f"{'dynamic' if self.dynamic else f'fixed input {self.fixed_shape}'})")

    @property
    def model(self):
        """The underlying DetectionModel, ScriptModule, onnxruntime session or OpenVINO CompiledModel."""
        runner = self._runner
        return runner.session if isinstance(runner, _OnnxRunner) else runner.model

    def warmup(self, imgsz: tuple[int, int, int, int] = (1, 3, 640, 640)) -> None:
        """One forward on zeros (the exported shape for fixed-shape files) so the first real image is
        not charged for lazy initialisation. Skipped for PyTorch on the CPU, where there is none."""
        if self.kind == "pytorch" and self.device.type == "cpu":
            return
        if self.fixed_shape is not None:
            imgsz = (self.fixed_shape[0], 3, self.fixed_shape[1], self.fixed_shape[2])
        self(torch.zeros(imgsz, device=self.device))

    @torch.no_grad()
    def __call__(self, im: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, N, 5 + nc) float32 decoded rows
        [x, y, w, h (input pixels), obj, cls scores...]. `augment` runs YOLOv5's test-time augmentation
        (PyTorch checkpoints only)."""
        self._check_input(im)
        im = im.to(self.device, self._runner.input_dtype)
        if augment:
            if self.kind != "pytorch":
                raise ValueError(f"test-time augmentation (--augment) needs a .pt checkpoint; {self.weights} "
                                 f"is {self.kind}")
            return self._forward_augment(im).float()
        return self._forward_fixed(im).float() if self.fixed_shape else self._run(im).float()

    def _run(self, im: torch.Tensor) -> torch.Tensor:
        """The rows of every model of an ensemble side by side (YOLOv5's Ensemble: NMS then merges them)."""
        if len(self._runners) == 1:
            return self._runner(im)
        return torch.cat([runner(im).float() for runner in self._runners], 1)

    def _check_input(self, im: Any) -> None:
        if not isinstance(im, torch.Tensor) or im.dim() != 4 or im.shape[1] != 3:
            shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"{self.weights}: expected a (B, 3, H, W) image tensor, got {shape}")
        if not im.is_floating_point():
            raise ValueError(f"{self.weights}: expected float images in [0, 1], got dtype {im.dtype} "
                             "(divide uint8 images by 255)")
        h, w = im.shape[2:]
        if self.fixed_shape and (h, w) != tuple(self.fixed_shape[1:]):
            fixed_h, fixed_w = self.fixed_shape[1:]
            raise ValueError(f"{self.weights} was exported for {fixed_h}x{fixed_w} input, got {h}x{w}; use "
                             f"--imgsz {fixed_h} {fixed_w} (letterbox with auto=False) or export with "
                             "--dynamic")
        if h % self.stride or w % self.stride:
            raise ValueError(f"{self.weights}: input {h}x{w} is not a multiple of the stride {self.stride}")

    def _forward_fixed(self, im: torch.Tensor) -> torch.Tensor:
        """Run a fixed-batch file on any batch: chunks of its batch size, the last one zero-padded."""
        size = self.fixed_shape[0]
        if im.shape[0] == size:
            return self._runner(im)
        outputs = []
        for chunk in im.split(size):
            count = chunk.shape[0]
            if count < size:
                chunk = torch.cat((chunk, chunk.new_zeros((size - count, *chunk.shape[1:]))))
            outputs.append(self._runner(chunk)[:count])
        return torch.cat(outputs)

    def _forward_augment(self, im: torch.Tensor) -> torch.Tensor:
        """Test-time augmentation of each model (of an ensemble), rows side by side."""
        return torch.cat([self._augment_one(runner, im) for runner in self._runners], 1)

    def _augment_one(self, runner, im: torch.Tensor) -> torch.Tensor:
        """YOLOv5's TTA: the image at scales 1, 0.83 (flipped left-right) and 0.67; predictions mapped
        back to the input's pixels. The largest-stride rows of the full-size pass and the smallest-stride
        rows of the smallest pass are dropped (they duplicate what the other scales see better)."""
        height, width = im.shape[2:]
        outputs = []
        for scale, flip in zip(TTA_SCALES, TTA_FLIPS):
            x = scale_image(im.flip(flip) if flip else im, scale, self.stride)
            pred = runner(x).clone().float()
            pred[..., :4] /= scale
            if flip == 3:
                pred[..., 0] = width - pred[..., 0]
            outputs.append((pred, x.shape[2:]))
        first, first_size = outputs[0]
        last, last_size = outputs[-1]
        first = first[:, : first.shape[1] - _rows_per_level(runner, first_size)[-1]]
        last = last[:, _rows_per_level(runner, last_size)[0]:]
        return torch.cat([first, *(p for p, _ in outputs[1:-1]), last], 1)


def _rows_per_level(runner: _PyTorchRunner, size: tuple[int, int]) -> list[int]:
    """Decoded rows each Detect level of the model contributes for an input of (H, W), in output order."""
    h, w = size
    return [runner.anchors_per_cell * math.ceil(h / s) * math.ceil(w / s) for s in runner.strides]


def _check_bf16(paths: list[Path], device: torch.device, fp16: bool, allow_emulated: bool) -> bool:
    """Refuse bf16 where it cannot run (see InferenceBackend); True when it runs emulated."""
    from engine import precision

    others = [str(p) for p in paths if weights_kind(p) not in ("pytorch", "openvino")]
    if others:
        raise ValueError(f"bf16 (--bf16) runs our .pt checkpoints under torch.autocast and OpenVINO models "
                         f"in OpenVINO's bf16 precision; {', '.join(others)} is another export (run it in "
                         f"its own precision, or pass the .pt)")
    if weights_kind(paths[0]) == "openvino" and not precision.cpu_bf16_support().native:
        raise ValueError(f"bf16 (--bf16) for the OpenVINO model {paths[0]}: this CPU has no native bf16 "
                         f"(AVX-512 BF16 or AMX), and OpenVINO does not emulate it; run it in float32")
    if fp16:
        raise ValueError("--bf16 and --half cannot be combined; pick one")
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"bf16 (--bf16): CUDA device {device} does not support bfloat16")
        return False
    if device.type != "cpu":
        raise ValueError(f"bf16 (--bf16) is supported on the CPU and CUDA, not on {device.type}")
    return precision.check_cpu_bf16("bf16 (--bf16)", allow_emulated)


def _make_runners(paths: list[Path], device: torch.device, fp16: bool, fuse: bool,
                  bf16: bool = False) -> list:
    """One runner per file; several files make an ensemble, which takes our .pt checkpoints only and
    needs them to agree on the classes."""
    kind = weights_kind(paths[0])
    if len(paths) == 1:
        if kind == "pytorch":
            return [_PyTorchRunner(paths[0], device, fp16, fuse, bf16)]
        if kind == "openvino":
            return [_OpenVINORunner(paths[0], device, bf16)]
        runner = _TorchScriptRunner if kind == "torchscript" else _OnnxRunner
        return [runner(paths[0], device, fp16)]
    others = [p for p in paths if weights_kind(p) != "pytorch"]
    if others:
        raise ValueError(f"an ensemble of several --weights takes .pt checkpoints only (as YOLOv5's); "
                         f"{', '.join(map(str, others))} {'is' if len(others) == 1 else 'are'} not")
    runners = [_PyTorchRunner(p, device, fp16, fuse, bf16) for p in paths]
    for path, runner in zip(paths[1:], runners[1:]):
        if runner.names != runners[0].names:
            raise ValueError(f"ensemble: {path} predicts classes {runner.names}, {paths[0]} predicts "
                             f"{runners[0].names}; an ensemble needs the same classes")
    return runners
