"""The predictor behind detect.py: run a detector on images, videos, webcams and streams and save
annotated media, labels, crops and a CSV.

    from engine.predictor import PredictOptions, predict
    save_dir = predict(PredictOptions(weights="best.pt", source="images/", save_txt=True))

--source takes an image, a folder, a glob, a .txt list of files, a video, a FIFO (read as a video),
a webcam index, an http(s) URL of an image (fetched, then read as a file), another rtsp/rtmp/http(s)
URL (read as a stream) or a .streams file listing several. Results go to runs/detect/exp, exp2, ...:
annotated images (same name), annotated videos (<stem>.mp4, 'mp4v', the source's fps and frame size;
with --vid-stride N only every N-th frame is written, at the source fps as YOLOv5 does),
labels/<stem>.txt (labels/<stem>_<frame>.txt for video frames; one line per box: class x_centre
y_centre width height, normalised to [0, 1], then conf with --save-conf), crops/<class name>/<stem>.jpg
and predictions.csv (image, frame, class_id, class_name, confidence, x1, y1, x2, y2 in pixels of the
original image).

Class names come from the weights file and stems from stream URLs, so each is made one safe path
component before it names a file (utils.paths.safe_path_component: '../x' becomes '.._x~<hash>'); a
source of which not one image or frame can be read is an error, a video that ends early a warning.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from data.sources import LoadImages, LoadStreams, expand_source, fetch_image_url, is_image_url
from engine.backend import InferenceBackend
from engine.detector import Detector
from engine.pipeline import BackgroundCalls, prefetch
from engine.profiling import StageTimer
from engine.results import annotate, crop_folders, describe, save_crops
from utils.boxes import xyxy2xywh
from utils.general import increment_path
from utils.paths import safe_path_component
from utils.torch_utils import time_sync

LOGGER = logging.getLogger(f"vitdet.{__name__}")
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")
CSV_HEADER = ("image", "frame", "class_id", "class_name", "confidence", "x1", "y1", "x2", "y2")


@dataclass
class SaveOptions:
    """What to write for each image or frame, and how to draw it."""

    save_dir: Path
    save_img: bool
    save_txt: bool
    save_conf: bool
    save_crop: bool
    save_csv: bool
    view_img: bool
    line_thickness: int
    hide_labels: bool
    hide_conf: bool


class ResultWriter:
    """Writes one image's or frame's detections as annotated image/video, labels, crops and CSV rows.

    det: (k, 6) [x1, y1, x2, y2 (pixels of im0), conf, cls]; im0: the original BGR (H, W, 3) image.
    """

    def __init__(self, options: SaveOptions, names: Sequence[str]):
        self.options, self.names = options, list(names)
        self.crop_folders = crop_folders(self.names)  # names come from the weights file
        if options.save_crop:
            _warn_renamed_classes(self.names, self.crop_folders)
        self.videos: dict[int, tuple[Path, cv2.VideoWriter]] = {}  # per source index: (path, writer)
        self.label_files: set[Path] = set()
        self.csv_path = options.save_dir / "predictions.csv"

    def write(self, det: torch.Tensor, im0: np.ndarray, path: Path, frame: int, video: bool, index: int,
              fps: float) -> None:
        o = self.options
        crop_source = im0.copy() if o.save_crop else None
        stem = output_stem(path)
        if o.save_txt and len(det):
            label_stem = f"{stem}_{frame}" if video else stem
            self._write_labels(det, im0.shape, o.save_dir / "labels" / f"{label_stem}.txt")
        if o.save_csv and len(det):
            self._write_csv(det, path.name, frame if video else 0)
        if crop_source is not None:
            self._write_crops(det, crop_source, stem)
        annotated = self._annotate(det, im0) if (o.save_img or o.view_img) else im0
        if o.view_img:
            cv2.imshow(str(path), annotated)
            cv2.waitKey(1)
        if o.save_img and video:
            self._write_video_frame(index, o.save_dir / f"{stem}.mp4", annotated, fps)
        elif o.save_img and not cv2.imwrite(str(o.save_dir / safe_path_component(path.name)), annotated):
            LOGGER.warning(f"{o.save_dir / safe_path_component(path.name)}: could not be written")

    def _annotate(self, det: torch.Tensor, im0: np.ndarray) -> np.ndarray:
        o = self.options
        return annotate(det, im0, self.names, o.line_thickness, labels=not o.hide_labels,
                        conf=not o.hide_conf)

    def _write_labels(self, det: torch.Tensor, shape: tuple[int, ...], file: Path) -> None:
        """YOLO lines: class x y w h normalised by the original image size (+ conf with --save-conf)."""
        gain = torch.tensor(shape)[[1, 0, 1, 0]].float()
        lines = []
        for *xyxy, conf, cls in det.tolist():
            xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
            values = (int(cls), *xywh, conf) if self.options.save_conf else (int(cls), *xywh)
            lines.append(" ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values))
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "a") as f:  # append: two sources with the same stem share one file, as YOLOv5
            f.write("\n".join(lines) + "\n")
        self.label_files.add(file)

    def _write_csv(self, det: torch.Tensor, image_name: str, frame: int) -> None:
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(CSV_HEADER)
            for x1, y1, x2, y2, conf, cls in det.tolist():
                writer.writerow((image_name, frame, int(cls), self.names[int(cls)], f"{conf:.4f}",
                                 *(f"{v:.1f}" for v in (x1, y1, x2, y2))))

    def _write_crops(self, det: torch.Tensor, image: np.ndarray, stem: str) -> None:
        save_crops(det, image, self.options.save_dir / "crops", self.crop_folders, stem)

    def _write_video_frame(self, index: int, save_path: Path, frame: np.ndarray, fps: float) -> None:
        current = self.videos.get(index)
        if current is None or current[0] != save_path:
            if current is not None:
                current[1].release()
            h, w = frame.shape[:2]
            writer = cv2.VideoWriter(str(save_path), cv2.VideoWriter_fourcc(*"mp4v"), fps or 30.0, (w, h))
            if not writer.isOpened():
                raise RuntimeError(f"{save_path}: cannot open an 'mp4v' video writer ({w}x{h} at {fps} fps)")
            self.videos[index] = current = (save_path, writer)
        current[1].write(frame)

    def close(self) -> None:
        for _, writer in self.videos.values():
            writer.release()
        self.videos.clear()
        if self.options.view_img:
            cv2.destroyAllWindows()


def output_stem(path: Path) -> str:
    """The stem that names a source's outputs (<stem>.mp4, labels/<stem>.txt, crops/*/<stem>.jpg), made a
    safe path component: a stream's 'path' is its URL, whose last part may be '..' or empty."""
    return safe_path_component(path.stem)


def _warn_renamed_classes(names: Sequence[str], folders: Sequence[str]) -> None:
    for name, folder in zip(names, folders):
        if name != folder:
            LOGGER.warning(f"class name {name!r} is not a safe folder name; its crops go to crops/{folder}/")


def is_stream(source: str) -> bool:
    """Webcam index, rtsp/rtmp/http(s) URL (except an http(s) URL of an image, which is fetched as a
    file) or a .streams list: read live with LoadStreams."""
    if is_image_url(source):
        return False
    return source.isnumeric() or source.endswith(".streams") or source.lower().startswith(STREAM_PREFIXES)


def can_show_images() -> bool:
    """True when cv2.imshow works here (a GUI build of OpenCV and a display)."""
    has_display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if sys.platform.startswith("linux") and not has_display:
        return False
    try:
        cv2.imshow("check", np.zeros((8, 8, 3), np.uint8))
        cv2.waitKey(1)
        cv2.destroyAllWindows()
        return True
    except cv2.error:
        return False


def _input_size(detector: Detector) -> tuple[int, int]:
    """--imgsz rounded to the stride; a fixed-shape export dictates its own size (with a warning)."""
    size = detector.input_size()
    wanted = (detector.imgsz, detector.imgsz) if isinstance(detector.imgsz, int) else tuple(detector.imgsz)
    wanted = wanted * 2 if len(wanted) == 1 else wanted
    backend = detector.backend
    if backend.fixed_shape and tuple(wanted) != size:
        LOGGER.warning(f"{backend.weights} was exported for {size[0]}x{size[1]}; using that instead of "
                       f"--imgsz {wanted[0]} {wanted[1]}")
    return size


@dataclass
class PredictOptions:
    """Everything detect.py's flags say: the model, the source, thresholds and what to save."""

    weights: str | Path
    source: str | Path
    imgsz: int | Sequence[int] = (640, 640)
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    device: str = ""
    view_img: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    save_csv: bool = False
    nosave: bool = False
    classes: Sequence[int] | None = None
    agnostic_nms: bool = False
    augment: bool = False
    project: str | Path = "runs/detect"
    name: str = "exp"
    exist_ok: bool = False
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False
    half: bool = False
    bf16: bool = False  # bf16 autocast of a .pt model on a CPU with native bf16 (InferenceBackend's bf16)
    vid_stride: int = 1
    profile: bool = False  # log one per-stage timing line at the end (engine.profiling)

    def save_options(self, save_dir: Path, view_img: bool) -> SaveOptions:
        return SaveOptions(save_dir, not self.nosave, self.save_txt, self.save_conf, self.save_crop,
                           self.save_csv, view_img, self.line_thickness, self.hide_labels, self.hide_conf)

    def detector(self, backend: InferenceBackend) -> Detector:
        """The Python API's Detector around `backend`, with these thresholds (detect.py runs through it)."""
        return Detector(backend, conf=self.conf_thres, iou=self.iou_thres, classes=self.classes,
                        max_det=self.max_det, imgsz=self.imgsz, augment=self.augment,
                        agnostic=self.agnostic_nms)


def run(weights: str | Path, source: str | Path, **options) -> Path:
    """detect.py's `run(weights, source, conf_thres=..., ...)`: the fields of PredictOptions."""
    return predict(PredictOptions(weights, source, **options))


def predict(opt: PredictOptions) -> Path:
    """Detect objects in `opt.source` with `opt.weights` (.pt, .torchscript or .onnx); returns the
    results folder.

    An http(s) URL of an image is first fetched into a temporary folder and read as a file.
    Raises FileNotFoundError naming a missing source or weights file, ValueError for bad options
    (--half on the CPU, --classes out of range) and for a source of which no image or video frame
    could be read, ConnectionError for a stream that cannot be opened or an image URL that cannot be
    fetched.
    """
    source = str(opt.source)
    if opt.vid_stride < 1:
        raise ValueError(f"--vid-stride {opt.vid_stride}: must be >= 1")
    if not is_image_url(source):
        return _predict(opt, source, source)
    with tempfile.TemporaryDirectory(prefix="vitdet-url-") as folder:
        local = fetch_image_url(source, folder)
        LOGGER.info(f"{source}: fetched {local.stat().st_size} bytes to {local}")
        return _predict(opt, str(local), source)


def _predict(opt: PredictOptions, source: str, shown_as: str) -> Path:
    """predict() on a local or stream `source`; `shown_as` names it in errors (the URL of a fetched image)."""
    stream = is_stream(source)
    if not stream:
        expand_source(source)  # fail fast on a missing source, before loading any weights
    backend = InferenceBackend(opt.weights, device=opt.device, fp16=opt.half, bf16=opt.bf16)
    with _torch_threads_for(backend):
        return _predict_with(opt, backend, source, shown_as, stream)


@contextlib.contextmanager
def _torch_threads_for(backend: InferenceBackend):
    """One torch CPU thread while another runtime (ONNX Runtime, OpenVINO) runs the model: torch then only
    converts tensors and runs NMS, small ops whose fan-out to more threads costs more than it saves and
    whose spinning OpenMP workers compete with the runtime's own threads for the cores (on 2 cores this
    made pre-process + NMS ~30 ms instead of ~4 ms per frame). Restored afterwards."""
    if backend.format.capabilities.torch_threads or backend.device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _predict_with(opt: PredictOptions, backend: InferenceBackend, source: str, shown_as: str,
                  stream: bool) -> Path:
    """_predict's loop once the weights are loaded."""
    detector = opt.detector(backend)
    detector.checked_classes()  # fail fast on --classes the model does not have
    size = _input_size(detector)
    view_img = opt.view_img
    if view_img and not can_show_images():
        LOGGER.warning("--view-img: no display or a headless OpenCV build here; images will not be shown")
        view_img = False
    loader = LoadStreams if stream else LoadImages
    # auto: minimal letterbox padding only when the backend accepts any size
    dataset = loader(source, img_size=size, stride=backend.stride, auto=backend.dynamic,
                     vid_stride=opt.vid_stride)
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    writer = ResultWriter(opt.save_options(save_dir, view_img), backend.names)
    backend.warmup((len(dataset) if stream else 1, 3, *size))
    # frames are decoded and letterboxed a few ahead on one thread, written on another (not when shown:
    # cv2.imshow belongs to the main thread)
    timer = StageTimer() if opt.profile else None
    write_one = timer.wrap("draw/write", writer.write) if timer else writer.write
    write = write_one if view_img else BackgroundCalls(write_one)
    frames = _frames(dataset, stream)
    frames = prefetch(timer.iterate("read", frames) if timer else frames)
    try:
        times, seen, shape = _detect_loop(detector, timer.iterate("wait", frames) if timer else frames, write)
    finally:
        if write is not write_one:
            write.close()
        writer.close()
    if not seen and not stream:
        _nothing_read(dataset, shown_as, save_dir)
    _log_summary(times, seen, shape, save_dir, writer)
    if timer:
        for stage, total in zip(("pre-process", "inference", "NMS"), times):
            timer.add(stage, total)
        LOGGER.info(timer.line(seen))
    return save_dir


def _nothing_read(dataset: LoadImages, source: str, save_dir: Path) -> None:
    """Raise the error for a source that gave no image and no frame (removing the empty results folder)."""
    with contextlib.suppress(OSError):
        save_dir.rmdir()  # only if empty: nothing was written
    problems = dataset.unreadable
    listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    raise ValueError(f"{source}: no image or video frame could be read ({listed})")


def _frames(dataset, stream: bool):
    """(letterboxed CHW RGB image(s), one frame context per image) for every dataset item. The context
    (path, copy of the original image, frame number, is-video, fps, log prefix) is read here, next to
    the item, because the loader's counters run ahead when items are prefetched."""
    for path, im, im0s, vid_cap, status in dataset:
        count = len(im0s) if stream else 1
        yield im, [_frame_context(dataset, stream, i, path, im0s, vid_cap, status) for i in range(count)]


def _detect_loop(detector: Detector, frames, write):
    """Infer, suppress and hand every image/frame to `write`; returns (stage times, images, shape).
    Boxes are scaled to the original image but not rounded (drawing rounds), as the Python API's.
    Pre-process time is what is left on this thread (tensor conversion): decoding and letterboxing
    overlap inference on the prefetch thread."""
    times, seen, shape, device = [0.0, 0.0, 0.0], 0, None, detector.device
    for im, contexts in frames:
        t0 = time_sync(device)
        x = torch.from_numpy(im).to(device).float() / 255  # uint8 0-255 -> float 0-1
        x = x[None] if x.dim() == 3 else x
        t1 = time_sync(device)
        pred = detector.forward(x)
        t2 = time_sync(device)
        dets = detector.postprocess(pred, x.shape[2:], [context[1] for context in contexts])
        t3 = time_sync(device)
        for stage, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            times[stage] += dt
        shape = tuple(x.shape)
        for i, (det, (p, im0, frame, video, fps, prefix)) in enumerate(zip(dets, contexts)):
            seen += 1
            write(det, im0, p, frame, video, i, fps)
            found = describe(det, detector.names)
            LOGGER.info(f"{prefix}{x.shape[2]}x{x.shape[3]} {found}{(t2 - t1) * 1e3:.1f}ms")
    return times, seen, shape


def _frame_context(dataset, stream: bool, i: int, path, im0s, vid_cap, status: str):
    """(path, copy of the original image, frame number, is-video, fps, log prefix) of batch item i."""
    if stream:
        return Path(path[i]), im0s[i].copy(), dataset.count, True, dataset.fps[i], f"{i}: "
    video = dataset.mode == "video"
    fps = vid_cap.get(cv2.CAP_PROP_FPS) if vid_cap is not None else 0.0
    return Path(path), im0s.copy(), dataset.frame if video else 0, video, fps, status


def _log_summary(times: list[float], seen: int, shape, save_dir: Path, writer: ResultWriter) -> None:
    if seen:
        pre, infer, nms = (t / seen * 1e3 for t in times)
        LOGGER.info(f"Speed: {pre:.1f}ms pre-process, {infer:.1f}ms inference, {nms:.1f}ms NMS per image "
                    f"at shape {shape}")
    labels = len(writer.label_files)
    saved = f", {labels} label files in {save_dir / 'labels'}" if writer.options.save_txt else ""
    LOGGER.info(f"Results saved to {save_dir}{saved}")
