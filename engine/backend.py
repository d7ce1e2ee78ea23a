"""One inference front for detect.py and val.py: our checkpoints, TorchScript and ONNX files alike.

    backend = InferenceBackend("runs/train/exp/weights/best.onnx", device="cpu")
    pred = backend(images)          # images: (B, 3, H, W) float in [0, 1], RGB
    # pred: (B, N, 5 + nc) rows [x, y, w, h (pixels of the input), obj, cls scores...]

The three kinds give the same decoded rows (what `DetectionModel` returns in eval mode), so NMS and
everything after it never needs to know which file was loaded. Exported files carry their stride and
class names as metadata (ONNX `metadata_props`; TorchScript `_extra_files['config.txt']`, JSON), written
by `engine.exporter`.

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

KINDS = {".pt": "pytorch", ".torchscript": "torchscript", ".onnx": "onnx"}
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

    def __init__(self, path: Path, device: torch.device, fp16: bool, fuse: bool):
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
        self.dynamic, self.fixed_shape, self.fp16 = True, None, fp16
        self.input_dtype = torch.float16 if fp16 else torch.float32

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        out = self.model(im)
        return out[0] if isinstance(out, (tuple, list)) else out


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

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: im.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(im.device)


# -- the front ----------------------------------------------------------------------------------------
class InferenceBackend:
    """Load `.pt` (our checkpoints), `.torchscript` or `.onnx` weights and run them the same way.

    Attributes:
        kind: 'pytorch', 'torchscript' or 'onnx'.
        stride: the model's largest stride in pixels (int); input sides must be multiples of it.
        names: class names, index = class id.
        dynamic: True when any input size (multiple of `stride`) and batch work.
        fixed_shape: (B, H, W) the file was exported for, or None when dynamic.
        fp16: True when the model runs in float16 (inputs are converted).
        device: the torch.device the outputs are on.
    """

    def __init__(self, weights: str | Path | list, device: str | torch.device = "cpu", fp16: bool = False,
                 fuse: bool = True):
        paths = [Path(w) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]
        for path in paths:
            if path.suffix not in KINDS:
                raise ValueError(f"weights {path}: unsupported format '{path.suffix}'; expected one of "
                                 f"{', '.join(KINDS)} (our checkpoints, TorchScript or ONNX exports)")
            if not path.is_file():
                raise FileNotFoundError(f"weights not found: {path}")
        self.device = select_device(device)
        if fp16 and self.device.type == "cpu":
            raise ValueError("fp16 (--half) needs a CUDA device; float16 inference is not supported on "
                             "the CPU")
        self.weights, self.kind = paths[0], KINDS[paths[0].suffix]
        self._runners = _make_runners(paths, self.device, fp16, fuse)
        self._runner = self._runners[0]
        self.stride = max(r.stride for r in self._runners)
        self.names = self._runner.names
        self.dynamic, self.fixed_shape = self._runner.dynamic, self._runner.fixed_shape
        self.fp16 = self._runner.fp16
        what = f"an ensemble of {len(paths)} models" if len(paths) > 1 else self.kind
        LOGGER.info(f"Loaded {', '.join(map(str, paths))} ({what}, stride {self.stride}, {len(self.names)} classes, "
                    f"{'dynamic' if self.dynamic else f'fixed input {self.fixed_shape}'})")

    @property
    def model(self):
        """The underlying DetectionModel, ScriptModule or onnxruntime session."""
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


def _make_runners(paths: list[Path], device: torch.device, fp16: bool, fuse: bool) -> list:
    """One runner per file; several files make an ensemble, which takes our .pt checkpoints only and
    needs them to agree on the classes."""
    kind = KINDS[paths[0].suffix]
    if len(paths) == 1:
        if kind == "pytorch":
            return [_PyTorchRunner(paths[0], device, fp16, fuse)]
        runner = _TorchScriptRunner if kind == "torchscript" else _OnnxRunner
        return [runner(paths[0], device, fp16)]
    others = [p for p in paths if KINDS[p.suffix] != "pytorch"]
    if others:
        raise ValueError(f"an ensemble of several --weights takes .pt checkpoints only (as YOLOv5's); "
                         f"{', '.join(map(str, others))} {'is' if len(others) == 1 else 'are'} not")
    runners = [_PyTorchRunner(p, device, fp16, fuse) for p in paths]
    for path, runner in zip(paths[1:], runners[1:]):
        if runner.names != runners[0].names:
            raise ValueError(f"ensemble: {path} predicts classes {runner.names}, {paths[0]} predicts "
                             f"{runners[0].names}; an ensemble needs the same classes")
    return runners
