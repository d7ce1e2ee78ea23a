"""Inference sources for detect.py: image files/folders/globs/lists and videos, and live streams.

Both yield (path(s), im, im0, vid_cap, status) as YOLOv5's loaders do:
  im   -- letterboxed RGB uint8 numpy array, (3, H, W) (LoadStreams: (N, 3, H, W))
  im0  -- the original BGR image, (H0, W0, 3) (LoadStreams: a list of them)
"""

from __future__ import annotations

import glob
import logging
import math
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from data.augment import letterbox
from data.verify import IMG_FORMATS, VID_FORMATS

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def _suffix(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def expand_source(path: str | Path | list) -> list[str]:
    """Files named by a file, folder (not recursive), glob pattern, .txt list, or a list of those.

    Raises FileNotFoundError naming a source that does not exist.
    """
    sources = path if isinstance(path, (list, tuple)) else [path]
    files = []
    for source in sources:
        p = str(Path(source).expanduser())
        if p.endswith(".txt") and os.path.isfile(p):
            lines = Path(p).read_text(encoding="utf-8").splitlines()
            listed = [os.path.join(os.path.dirname(p), x.strip()) for x in lines if x.strip()]
            files += expand_source(listed)
        elif any(c in p for c in "*?["):
            files += sorted(glob.glob(p, recursive=True))
        elif os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "*.*")))
        elif os.path.isfile(p):
            files.append(os.path.abspath(p))
        else:
            raise FileNotFoundError(f"source {p} does not exist")
    return files


class LoadImages:
    """Iterate over images, then videos (frame by frame, every vid_stride-th frame).

    Attributes: files, nf, mode ('image' or 'video'), frame (frames read from the current video),
    frames (frames the current video will yield), fps (of the current video, 0 for images).
    An image that cannot be decoded is reported with a warning and skipped.
    """

    def __init__(self, path, img_size: int = 640, stride: int = 32, auto: bool = True, vid_stride: int = 1):
        files = expand_source(path)
        images = [f for f in files if _suffix(f) in IMG_FORMATS]
        videos = [f for f in files if _suffix(f) in VID_FORMATS]
        for f in sorted(set(files) - set(images) - set(videos)):
            LOGGER.warning(f"{f}: not an image or video format, skipped")
        self.files, self.video_flag = images + videos, [False] * len(images) + [True] * len(videos)
        self.nf = len(self.files)
        self.img_size, self.stride, self.auto, self.vid_stride = img_size, stride, auto, vid_stride
        self.mode, self.cap, self.frame, self.frames, self.fps = "image", None, 0, 0, 0.0
        if not self.nf:
            raise FileNotFoundError(
                f"no images or videos found in {path}. Supported: images {IMG_FORMATS}, videos {VID_FORMATS}"
            )
        if videos:
            self._open_video(videos[0])

    def __len__(self) -> int:
        return self.nf

    def __iter__(self):
        self.count = 0
        return self

    def _open_video(self, path: str) -> None:
        self.frame = 0
        self.cap = cv2.VideoCapture(path)
        total = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frames = math.ceil(total / self.vid_stride) if total > 0 else 0
        self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 0.0

    def _next_frame(self) -> tuple[str, np.ndarray] | None:
        """(path, frame) from the current video, moving on to the next video at the end; None when done."""
        while self.count < self.nf:
            path = self.files[self.count]
            for _ in range(self.vid_stride - 1):
                self.cap.grab()
            ok, frame = self.cap.read()
            if ok:
                self.frame += 1
                return path, frame
            self.cap.release()
            self.count += 1
            if self.count < self.nf:
                self._open_video(self.files[self.count])
        return None

    def __next__(self):
        while True:
            if self.count >= self.nf:
                raise StopIteration
            path = self.files[self.count]
            if self.video_flag[self.count]:
                self.mode = "video"
                got = self._next_frame()
                if got is None:
                    raise StopIteration
                path, im0 = got
                status = f"video {self.count + 1}/{self.nf} ({self.frame}/{self.frames}) {path}: "
                cap = self.cap
            else:
                self.count += 1
                im0 = cv2.imread(path)
                if im0 is None:
                    LOGGER.warning(f"image {self.count}/{self.nf} {path}: cannot be decoded, skipped")
                    continue
                status, cap = f"image {self.count}/{self.nf} {path}: ", None
            im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
            im = np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
            return path, im, im0, cap, status


class LoadStreams:
    """Live sources (webcam index, rtsp/http URL, or a video file read as a stream), one reader
    thread each; every step yields the newest frame of every stream.

    sources: one source, a list, or a .txt/.streams file listing them. A stream that cannot be
    opened or gives no first frame raises ConnectionError naming it. Iteration ends when a
    reader thread ends (a finite source ran out).
    """

    def __init__(
        self, sources="0", img_size: int = 640, stride: int = 32, auto: bool = True, vid_stride: int = 1
    ):
        is_list = isinstance(sources, (str, Path)) and Path(sources).suffix in (".txt", ".streams")
        if is_list and os.path.isfile(sources):
            sources = Path(sources).read_text().split()
        self.sources = [str(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
        self.img_size, self.stride, self.vid_stride = img_size, stride, vid_stride
        self.mode, self.frames, self.fps = "stream", [], []
        self.imgs, self.threads, self.caps = [], [], []
        for i, source in enumerate(self.sources):
            cap = cv2.VideoCapture(int(source) if source.isnumeric() else source)
            ok, frame = cap.read() if cap.isOpened() else (False, None)
            if not ok:
                cap.release()
                where = f"stream {i + 1}/{len(self.sources)} {source}"
                raise ConnectionError(f"{where}: cannot be opened or read")
            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            self.frames.append(total if total > 0 else float("inf"))
            self.fps.append(cap.get(cv2.CAP_PROP_FPS) or 30.0)
            self.imgs.append(frame)
            self.caps.append(cap)
            thread = threading.Thread(target=self._read, args=(i, cap), daemon=True)
            self.threads.append(thread)
            thread.start()
            LOGGER.info(f"stream {i + 1}/{len(self.sources)} {source}: {frame.shape[1]}x{frame.shape[0]}")
        shapes = {letterbox(x, img_size, stride=stride, auto=auto)[0].shape for x in self.imgs}
        self.auto = auto and len(shapes) == 1  # equal shapes are needed to stack the batch

    def _read(self, i: int, cap: cv2.VideoCapture) -> None:
        """Reader thread: keep self.imgs[i] the newest frame until the source ends."""
        n = 1
        while cap.isOpened() and n < self.frames[i]:
            n += 1
            cap.grab()
            if n % self.vid_stride == 0:
                ok, frame = cap.retrieve()
                if not ok:
                    LOGGER.warning(f"stream {self.sources[i]}: no frame, ending it")
                    break
                self.imgs[i] = frame
            time.sleep(0.0)  # yield to the other threads
        cap.release()

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self):
        self.count = -1
        return self

    def __next__(self):
        self.count += 1
        if not all(t.is_alive() for t in self.threads):
            raise StopIteration
        im0 = [x.copy() for x in self.imgs]
        im = np.stack([letterbox(x, self.img_size, stride=self.stride, auto=self.auto)[0] for x in im0])
        im = np.ascontiguousarray(im[..., ::-1].transpose((0, 3, 1, 2)))  # BGR -> RGB, BHWC -> BCHW
        return self.sources, im, im0, None, ""
