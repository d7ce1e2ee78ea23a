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

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine import formats
from engine.formats import onnx as onnx_format
from engine.formats.onnx import read_onnx_metadata  # noqa: F401 (re-exported)
from engine.formats.openvino import SUFFIX as OPENVINO_SUFFIX
from engine.formats.openvino import openvino_model_files, read_openvino_metadata  # noqa: F401 (re-exported)
from engine.formats.pytorch import PyTorchRunner, keep_float32  # noqa: F401 (re-exported)
from engine.formats.torchscript import METADATA_FILE as TORCHSCRIPT_METADATA  # noqa: F401 (re-exported)
from engine.formats.torchscript import read_torchscript_metadata  # noqa: F401 (re-exported)
from utils.torch_utils import select_device

LOGGER = logging.getLogger(f"vitdet.{__name__}")

TTA_SCALES = (1.0, 0.83, 0.67)  # YOLOv5's test-time augmentation: scales ...
TTA_FLIPS = (None, 3, None)  # ... and flips (3 = left-right on a (B, C, H, W) tensor)
TTA_PAD_VALUE = 0.447  # grey fill of the padding after down-scaling (YOLOv5's ImageNet-mean value)


# -- formats (engine.formats); names kept here for the callers that import them from the backend ------
_OnnxRunner = onnx_format.OnnxRunner  # the class itself (tests patch its __call__)
KINDS = {fmt.suffix: name for name, fmt in formats.FORMATS.items() if not fmt.is_dir}


def weights_kind(path: Path) -> str | None:
    """The registry name of the format of `path` ('pytorch', 'onnx', 'openvino', ...); None if unknown."""
    fmt = formats.format_of(Path(path))
    return fmt.name if fmt else None


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
            fmt = formats.format_of(path)
            if fmt is None:
                raise ValueError(f"weights {path}: unsupported format '{path.suffix}'; expected one of "
                                 f"{', '.join(KINDS)} or a *{OPENVINO_SUFFIX}/ folder (our checkpoints, "
                                 f"TorchScript, ONNX or OpenVINO exports)")
            if not fmt.exists(path):
                raise FileNotFoundError(f"weights not found: {path}")
        self.device = select_device(device)
        if fp16 and self.device.type == "cpu":
            raise ValueError("fp16 (--half) needs a CUDA device; float16 inference is not supported on "
                             "the CPU")
        self.format = formats.format_of(paths[0])
        self.bf16_emulated = bf16 and _check_bf16(paths, self.device, fp16, allow_emulated_bf16)
        runners = _make_runners(paths, self.device, formats.RunOptions(fp16, fuse, bf16))
        self._attach(paths[0], self.format, runners)
        what = f"an ensemble of {len(paths)} models" if len(paths) > 1 else self.kind
        how = f", {self.precision}{' (emulated)' if self.bf16_emulated else ''}"
        LOGGER.info(f"Loaded {', '.join(map(str, paths))} ({what}{how}, stride {self.stride}, "
                    f"{len(self.names)} classes, "
                    f"{'dynamic' if self.dynamic else f'fixed input {self.fixed_shape}'})")

    def _attach(self, weights: Path | str, fmt: formats.Format, runners: list) -> None:
        """Take the attributes of the loaded runner(s)."""
        self.weights, self.format, self.kind = weights, fmt, fmt.name
        self._runners, self._runner = runners, runners[0]
        self.stride = max(r.stride for r in runners)
        self.names = self._runner.names
        self.dynamic, self.fixed_shape = self._runner.dynamic, self._runner.fixed_shape
        self.fp16, self.precision = self._runner.fp16, self._runner.precision

    @classmethod
    def from_model(cls, model: torch.nn.Module, device: str | torch.device = "") -> InferenceBackend:
        """A DetectionModel that is not in a file (a hub entry point without weights), run float32 through
        the PyTorch format's runner (any input size; no test-time augmentation: it needs a checkpoint)."""
        backend = cls.__new__(cls)
        backend.device, backend.bf16_emulated = select_device(device), False
        runner = PyTorchRunner(model.to(backend.device).eval(), backend.device)
        name = f"<{model.yaml.get('yaml_file', 'model')} in memory>"
        backend._attach(name, formats.get("pytorch"), [runner])
        backend.in_memory = True
        return backend

    @classmethod
    def from_runner(cls, weights: Path | str, runner, device: str | torch.device = "cpu") -> InferenceBackend:
        """A backend around a runner built by the caller (e.g. an OpenVINO runner of a model compiled in
        memory), named after `weights`, the file whose format and metadata it carries."""
        backend = cls.__new__(cls)
        backend.device, backend.bf16_emulated = select_device(device), False
        backend._attach(weights, formats.format_of(Path(weights)), [runner])
        return backend

    in_memory = False  # True for from_model

    @property
    def model(self):
        """The underlying DetectionModel, ScriptModule, onnxruntime session or OpenVINO CompiledModel."""
        return self._runner.model

    def warmup(self, imgsz: tuple[int, int, int, int] = (1, 3, 640, 640)) -> None:
        """One forward on zeros (the exported shape for fixed-shape files) so the first real image is
        not charged for lazy initialisation. Skipped where the format has none (eager PyTorch on the CPU)."""
        if not self.format.capabilities.lazy_init and self.device.type == "cpu":
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
            if not self.format.capabilities.augment or self.in_memory:
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


def _rows_per_level(runner: PyTorchRunner, size: tuple[int, int]) -> list[int]:
    """Decoded rows each Detect level of the model contributes for an input of (H, W), in output order."""
    h, w = size
    return [runner.anchors_per_cell * math.ceil(h / s) * math.ceil(w / s) for s in runner.strides]


def _check_bf16(paths: list[Path], device: torch.device, fp16: bool, allow_emulated: bool) -> bool:
    """Refuse bf16 where it cannot run (see InferenceBackend); True when it runs emulated."""
    from engine import precision

    others = [str(p) for p in paths if not formats.format_of(p).capabilities.bf16]
    if others:
        able = ", ".join(n for n, f in formats.FORMATS.items() if f.capabilities.bf16)
        raise ValueError(f"bf16 (--bf16) runs the formats {able} (our .pt checkpoints under torch.autocast, "
                         f"OpenVINO models in OpenVINO's bf16 precision); {', '.join(others)} is another "
                         f"export (run it in its own precision, or pass the .pt)")
    fmt = formats.format_of(paths[0])
    if fmt.capabilities.bf16_native_only and not precision.cpu_bf16_support().native:
        raise ValueError(f"bf16 (--bf16) for the {fmt.name} model {paths[0]}: this CPU has no native bf16 "
                         f"(AVX-512 BF16 or AMX), and {fmt.name} does not emulate it; run it in float32")
    if fp16:
        raise ValueError("--bf16 and --half cannot be combined; pick one")
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"bf16 (--bf16): CUDA device {device} does not support bfloat16")
        return False
    if device.type != "cpu":
        raise ValueError(f"bf16 (--bf16) is supported on the CPU and CUDA, not on {device.type}")
    return precision.check_cpu_bf16("bf16 (--bf16)", allow_emulated)


def _make_runners(paths: list[Path], device: torch.device, options: formats.RunOptions) -> list:
    """One runner per file; several files make an ensemble, which takes only formats that can ensemble
    (our .pt checkpoints) and needs them to agree on the classes."""
    fmt = formats.format_of(paths[0])
    if len(paths) == 1:
        return [fmt.runner(paths[0], device, options)]
    others = [p for p in paths if not formats.format_of(p).capabilities.ensemble]
    if others:
        raise ValueError(f"an ensemble of several --weights takes .pt checkpoints only (as YOLOv5's); "
                         f"{', '.join(map(str, others))} {'is' if len(others) == 1 else 'are'} not")
    runners = [formats.format_of(p).runner(p, device, options) for p in paths]
    for path, runner in zip(paths[1:], runners[1:]):
        if runner.names != runners[0].names:
            raise ValueError(f"ensemble: {path} predicts classes {runner.names}, {paths[0]} predicts "
                             f"{runners[0].names}; an ensemble needs the same classes")
        head, first_head = (type(r.model.model[-1]).__name__ for r in (runner, runners[0]))
        if head != first_head:  # obj x cls (Detect) and cls alone (DetectAF): scores NMS cannot compare
            raise ValueError(f"ensemble: {path} has a {head} head, {paths[0]} a {first_head} head; an "
                             f"ensemble needs one head kind (their confidences are not on the same scale)")
    return runners
