"""The Python API: a detector you call on images, returning Results.

    from engine import Detector
    detector = Detector("best.pt", conf=0.4)         # .pt, .torchscript, .onnx or an _openvino_model/ folder
    results = detector(["a.jpg", "https://host/b.jpg", frame_bgr, pil_image, tensor_chw])
    results.print(); records = results.to_records()

Each input is letterboxed exactly as detect.py letterboxes a file (the same function, size and
padding rule), run, suppressed with NMS and its boxes scaled back to the original image. detect.py
runs its frames through the same Detector (`forward` and `postprocess`), so the two never disagree.

Inputs: a path or http(s) image URL (str or Path), a numpy (H, W, 3) uint8 BGR array (as OpenCV reads
it) or (H, W) grey, a PIL image (any mode, converted to RGB), a torch tensor (3, H, W) or (B, 3, H, W)
RGB, uint8 in 0-255 or float in 0-1, or a list mixing any of these.
Attributes you may change between calls: conf, iou, classes, max_det, imgsz, agnostic, augment and
device (which reloads the weights onto the new device).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from data.augment import letterbox
from data.sources import fetch_image_url, is_image_url
from engine.backend import InferenceBackend, check_img_size
from engine.results import Results
from utils.boxes import scale_boxes
from utils.nms import non_max_suppression


class Detector:
    """Run a detector (weights file, loaded InferenceBackend or in-memory DetectionModel) on images.

    conf: confidence threshold; iou: NMS IoU threshold; classes: keep only these class ids (None = all);
    max_det: boxes per image; imgsz: inference size (int or (height, width), rounded up to the stride);
    device: '' (CUDA when available), 'cpu', '0', ...; half: float16 (CUDA only); augment: YOLOv5's
    test-time augmentation (.pt only); agnostic: class-agnostic NMS; batch_size: images of one
    letterboxed shape run together. The default 1 is what detect.py does and gives exactly its boxes;
    larger batches help on a GPU (little on a CPU) but change the float rounding, which can move a box
    that sits on the confidence or IoU threshold. plugins: Python files that register backbones (as
    --plugin does for the scripts; docs/bring-a-backbone.md).
    """

    def __init__(self, weights: str | Path | list | InferenceBackend | torch.nn.Module, conf: float = 0.25,
                 iou: float = 0.45, classes: Sequence[int] | None = None, max_det: int = 1000,
                 imgsz: int | Sequence[int] = 640, device: str | torch.device = "", half: bool = False,
                 augment: bool = False, agnostic: bool = False, batch_size: int = 1,
                 plugins: Sequence[str | Path] = ()):
        from models.backbones.plugins import load_plugins

        load_plugins(plugins)  # files that register backbones, before a checkpoint names one
        self.conf, self.iou, self.classes, self.max_det = conf, iou, classes, max_det
        self.imgsz, self.augment, self.agnostic, self.half = imgsz, augment, agnostic, half
        self.batch_size = batch_size
        self.weights = weights
        self.backend = _load(weights, device, half)

    # -- attributes ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.backend.names)

    @property
    def stride(self) -> int:
        return int(self.backend.stride)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @device.setter
    def device(self, device: str | torch.device) -> None:
        self.backend = _load(self.weights, device, self.half)

    def input_size(self) -> tuple[int, int]:
        """imgsz rounded up to the stride; a fixed-shape export dictates its own size (detect.py warns)."""
        if self.backend.fixed_shape:
            return tuple(self.backend.fixed_shape[1:])
        return check_img_size(self.imgsz, self.backend.stride)

    def checked_classes(self) -> list[int] | None:
        """`classes` as ints; ValueError naming the ids the model does not have."""
        if self.classes is None:
            return None
        names = self.names
        bad = [c for c in self.classes if not 0 <= int(c) < len(names)]
        if bad:
            raise ValueError(f"--classes {' '.join(map(str, bad))}: the model has {len(names)} classes "
                             f"(0..{len(names) - 1}: {', '.join(names)})")
        return [int(c) for c in self.classes]

    # -- the steps detect.py shares ------------------------------------------------------------------
    def letterbox(self, image: np.ndarray) -> np.ndarray:
        """BGR (H, W, 3) -> letterboxed RGB (3, h, w) uint8, as data.sources.LoadImages does it."""
        im = letterbox(image, self.input_size(), stride=self.backend.stride, auto=self.backend.dynamic)[0]
        return np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) float RGB in [0, 1] -> the model's raw (B, N, 5 + nc) rows."""
        return self.backend(x, augment=self.augment)

    def postprocess(self, pred: torch.Tensor, input_shape: Sequence[int],
                    originals: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """NMS, then boxes scaled from the (h, w) model input back to each original image (not rounded)."""
        dets = non_max_suppression(pred, self.conf, self.iou, classes=self.checked_classes(),
                                   agnostic=self.agnostic, max_det=self.max_det)
        for det, image in zip(dets, originals):
            det[:, :4] = scale_boxes(tuple(input_shape), det[:, :4], image.shape)
        return dets

    # -- the API -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, inputs: Any, imgsz: int | Sequence[int] | None = None) -> Results:
        """Detect objects in one input or a list of them (see the module docstring); `imgsz` overrides
        the attribute for this call."""
        if imgsz is not None:
            saved, self.imgsz = self.imgsz, imgsz
            try:
                return self(inputs)
            finally:
                self.imgsz = saved
        t0 = time.perf_counter()
        images, files = read_inputs(inputs)
        letterboxed = [self.letterbox(im) for im in images]
        times = [time.perf_counter() - t0, 0.0, 0.0]
        dets: list[torch.Tensor | None] = [None] * len(images)
        shape = None
        for indices in _batches_by_shape(letterboxed, self.batch_size):
            t1 = time.perf_counter()
            x = torch.from_numpy(np.stack([letterboxed[i] for i in indices])).to(self.device).float() / 255
            t2 = time.perf_counter()
            pred = self.forward(x)
            t3 = time.perf_counter()
            for i, det in zip(indices, self.postprocess(pred, x.shape[2:], [images[i] for i in indices])):
                dets[i] = det
            for stage, dt in enumerate((t2 - t1, t3 - t2, time.perf_counter() - t3)):
                times[stage] += dt
            shape = tuple(x.shape)
        per_image_ms = [t / max(len(images), 1) * 1e3 for t in times]
        return Results(images, dets, files, self.names, per_image_ms, shape)


def _load(weights, device, half: bool):
    if isinstance(weights, InferenceBackend):
        return weights
    if isinstance(weights, torch.nn.Module):
        return InMemoryModel(weights, device)
    return InferenceBackend(weights, device=device, fp16=half)


def InMemoryModel(model: torch.nn.Module, device: str | torch.device = "") -> InferenceBackend:
    """A DetectionModel that is not in a file, run with the interface of InferenceBackend (the PyTorch
    format's runner: float32, any input size, no test-time augmentation)."""
    return InferenceBackend.from_model(model, device)


def _batches_by_shape(letterboxed: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices grouped by letterboxed shape (so each image gets exactly detect.py's padding), in chunks
    of at most batch_size."""
    if batch_size < 1:
        raise ValueError(f"Detector batch_size {batch_size}: must be >= 1")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(letterboxed):
        groups.setdefault(im.shape, []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


# -- reading the inputs ------------------------------------------------------------------------------
def read_inputs(inputs: Any) -> tuple[list[np.ndarray], list[str]]:
    """BGR (H, W, 3) uint8 images and a file name for each, from one input or a list (tensors with a
    batch dimension give one image per item)."""
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not items:
        raise ValueError("Detector: no input given (an empty list)")
    images, files = [], []
    for item in items:
        for image, name in _read_one(item, len(images)):
            images.append(image)
            files.append(name)
    return images, files


def _read_one(item: Any, index: int) -> list[tuple[np.ndarray, str]]:
    if isinstance(item, (str, Path)):
        return [_read_path(str(item))]
    if isinstance(item, np.ndarray):
        return [(_from_array(item, index), f"image{index}.jpg")]
    if isinstance(item, torch.Tensor):
        return _from_tensor(item, index)
    if type(item).__module__.startswith("PIL."):
        name = Path(getattr(item, "filename", "") or f"image{index}.jpg").name
        return [(np.ascontiguousarray(np.asarray(item.convert("RGB"))[..., ::-1]), name)]
    raise TypeError(f"Detector input {index}: {type(item).__name__} is not a path, URL, numpy array, "
                    "PIL image or torch tensor")


def _read_path(path: str) -> tuple[np.ndarray, str]:
    if is_image_url(path):
        with tempfile.TemporaryDirectory(prefix="vitdet-url-") as folder:
            local = fetch_image_url(path, folder)
            image = cv2.imread(str(local))
            name = local.name
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Detector input {path}: no such file")
        image, name = cv2.imread(path), Path(path).name
    if image is None:
        raise ValueError(f"Detector input {path}: cannot be decoded as an image")
    return image, name


def _from_array(array: np.ndarray, index: int) -> np.ndarray:
    if array.ndim == 2:
        array = cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"Detector input {index}: expected an (H, W, 3) uint8 BGR array, got shape "
                         f"{array.shape} dtype {array.dtype}")
    return np.ascontiguousarray(array)


def _from_tensor(tensor: torch.Tensor, index: int) -> list[tuple[np.ndarray, str]]:
    """(3, H, W) or (B, 3, H, W) RGB, uint8 0-255 or float 0-1 -> BGR uint8 arrays."""
    batch = tensor[None] if tensor.dim() == 3 else tensor
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"Detector input {index}: expected a (3, H, W) or (B, 3, H, W) RGB tensor, got "
                         f"{tuple(tensor.shape)}")
    if batch.is_floating_point():
        batch = (batch.detach().float().clamp(0, 1) * 255).round()
    arrays = batch.to(torch.uint8).permute(0, 2, 3, 1).flip(-1).cpu().numpy()  # RGB -> BGR, HWC
    return [(np.ascontiguousarray(a), f"image{index + k}.jpg") for k, a in enumerate(arrays)]
