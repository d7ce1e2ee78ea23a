"""Inference sources for detect.py: image files/folders/globs/lists and videos, FIFOs, image URLs
(fetched to a file) and live streams.

Both yield (path(s), im, im0, vid_cap, status) as YOLOv5's loaders do:
  im   -- letterboxed RGB uint8 numpy array, (3, H, W) (LoadStreams: (N, 3, H, W))
  im0  -- the original BGR image, (H0, W0, 3) (LoadStreams: a list of them)
"""

from __future__ import annotations

import glob
import http.client
import logging
import os
import shutil
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from data.augment import letterbox
from data.verify import IMG_FORMATS, VID_FORMATS
from utils.paths import safe_path_component

LOGGER = logging.getLogger(f"vitdet.{__name__}")
SKIPPED_NAMED = 3  # files named one per line before the summary of all skipped files
URL_PREFIXES = ("http://", "https://")
MAX_URL_IMAGE_BYTES = 100 * 2**20  # an image URL that sends more than this is refused, not fetched
URL_TIMEOUT_S = 30.0


def _suffix(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def is_fifo(path: str | Path) -> bool:
    """True for a named pipe (os.mkfifo), also through a symlink."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _regular_files(pattern: str, fifos: list[str] | None) -> list[str]:
    """Regular files matching the glob `pattern`, sorted. FIFOs that match are not listed but added
    to `fifos`: opening one blocks until something writes to it, so only a FIFO named on its own is
    opened. Folders are left out."""
    files = []
    for entry in sorted(glob.glob(pattern, recursive=True)):
        if os.path.isfile(entry):
            files.append(entry)
        elif is_fifo(entry) and fifos is not None:
            fifos.append(entry)
    return files


def expand_source(path: str | Path | list, fifos: list[str] | None = None) -> list[str]:
    """Files named by a file, folder (not recursive), glob pattern, .txt list, or a list of those.

    A FIFO named directly (or in a list) is returned like a file; FIFOs in a folder or matched by a
    glob are left out and appended to `fifos` when it is given. Raises FileNotFoundError naming a
    source that does not exist.
    """
    sources = path if isinstance(path, (list, tuple)) else [path]
    files = []
    for source in sources:
        p = str(Path(source).expanduser())
        if p.endswith(".txt") and os.path.isfile(p):
            lines = Path(p).read_text(encoding="utf-8").splitlines()
            listed = [os.path.join(os.path.dirname(p), x.strip()) for x in lines if x.strip()]
            files += expand_source(listed, fifos)
        elif any(c in p for c in "*?["):
            files += _regular_files(p, fifos)
        elif os.path.isdir(p):  # not recursive, no hidden files
            files += _regular_files(os.path.join(glob.escape(p), "*"), fifos)
        elif os.path.isfile(p) or is_fifo(p):
            files.append(os.path.abspath(p))
        else:
            raise FileNotFoundError(f"source {p} does not exist")
    return files


def _warn_unsupported(files: list[str]) -> None:
    """One line for each of the first few files that are neither image nor video, then a summary
    with their number and the supported formats."""
    if not files:
        return
    for f in files[:SKIPPED_NAMED]:
        why = " (no file extension)" if not _suffix(f) else ""
        LOGGER.warning(f"{f}: not an image or video format{why}, skipped")
    bare = sum(not _suffix(f) for f in files)
    names = ", ".join(os.path.basename(f) for f in files[:5]) + (", ..." if len(files) > 5 else "")
    LOGGER.warning(f"{len(files)} file{'s' if len(files) != 1 else ''} skipped, not an image or video format "
                   f"by their extension ({bare} without an extension): {names}. Supported: images "
                   f"{', '.join(IMG_FORMATS)}; videos {', '.join(VID_FORMATS)}")


def _warn_fifos(fifos: list[str]) -> None:
    for f in fifos:
        LOGGER.warning(f"{f}: is a FIFO (named pipe) in a folder or glob; not opened, since that would "
                       f"wait for a writer. Skipped: pass it as --source on its own to read it as a video")


def _why_unopenable(path: str) -> str:
    """Why OpenCV could not open a video file, as far as the file itself tells."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return f"cannot be read: {err.strerror}"
    if size == 0 and not is_fifo(path):
        return "empty file, 0 bytes"
    return "not a video OpenCV can decode: truncated, corrupt or not a video at all"


def is_image_url(source: str | Path) -> bool:
    """True for an http(s) URL whose path ends in an image suffix (the query is ignored):
    'https://host/a/b.jpg?token=1'. Such a URL is fetched and read as a file, as YOLOv5 does."""
    text = str(source)
    return text.lower().startswith(URL_PREFIXES) and _suffix(urllib.parse.urlparse(text).path) in IMG_FORMATS


def url_file_name(url: str) -> str:
    """The file name to save an image URL under: its last path component, unquoted, made a safe
    path component ('%2F..%2Fx.jpg' cannot name another folder) with its image suffix kept."""
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    stem, _, suffix = name.rpartition(".")
    return f"{safe_path_component(stem)}.{suffix}"


def fetch_image_url(url: str, folder: str | Path, timeout: float = URL_TIMEOUT_S) -> Path:
    """Download the image at `url` into `folder` (see url_file_name) and return its path.

    Raises ConnectionError naming the URL when it cannot be fetched (HTTP status, unreachable host,
    timeout) and ValueError when it sends more than MAX_URL_IMAGE_BYTES.
    """
    target = Path(folder) / url_file_name(url)
    request = urllib.request.Request(url, headers={"User-Agent": "vitdet-detect"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise ConnectionError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
        raise ConnectionError(f"{url}: cannot be fetched ({getattr(err, 'reason', err)})") from err
    with response, open(target, "wb") as f:
        try:
            shutil.copyfileobj(_LimitedReader(response, MAX_URL_IMAGE_BYTES, url), f)
        except (http.client.HTTPException, TimeoutError, ConnectionError) as err:
            raise ConnectionError(f"{url}: download broke off ({err})") from err
    return target


class _LimitedReader:
    """File-like view of an HTTP response that refuses to deliver more than `limit` bytes."""

    def __init__(self, response, limit: int, url: str):
        self.response, self.limit, self.url, self.delivered = response, limit, url, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.response.read(min(size, self.limit + 1) if size >= 0 else self.limit + 1)
        self.delivered += len(chunk)
        if self.delivered > self.limit:
            raise ValueError(f"{self.url}: sends more than {self.limit // 2**20} MiB; not an image to fetch")
        return chunk


class LoadImages:
    """Iterate over images, then videos (frame by frame, every vid_stride-th frame).

    Attributes: files, nf, mode ('image' or 'video'), frame (frames yielded from the current video),
    frames (frames the current video will yield, from CAP_PROP_FRAME_COUNT), fps (of the current
    video, 0 for images), unreadable (one 'path: reason' per image or video that gave nothing).

    A FIFO (named pipe) given as a source is read as a video whatever its name (opening it waits
    for a writer); FIFOs in a folder or glob are skipped with a warning. Files that are neither images
    nor videos by their extension (also files without one) are skipped with a warning. An image
    that cannot be decoded, a video that cannot be opened and a video that ends before the frame
    count its container gives are each reported with a warning naming the file and what was read.
    """

    def __init__(self, path, img_size: int = 640, stride: int = 32, auto: bool = True, vid_stride: int = 1):
        fifos: list[str] = []
        files = expand_source(path, fifos)
        videos = [f for f in files if _suffix(f) in VID_FORMATS or is_fifo(f)]
        video_set = set(videos)
        images = [f for f in files if _suffix(f) in IMG_FORMATS and f not in video_set]
        _warn_unsupported(sorted(set(files) - set(images) - video_set))
        _warn_fifos(fifos)
        self.files, self.video_flag = images + videos, [False] * len(images) + [True] * len(videos)
        self.nf = len(self.files)
        self.img_size, self.stride, self.auto, self.vid_stride = img_size, stride, auto, vid_stride
        self.mode, self.cap, self.frame, self.frames, self.fps = "image", None, 0, 0, 0.0
        self.frames_read, self.frames_expected, self.unreadable = 0, 0, []
        if not self.nf:
            raise FileNotFoundError(
                f"no images or videos found in {path}. Supported: images {IMG_FORMATS}, videos {VID_FORMATS}"
            )
        if videos:
            self.count = len(images)  # for the messages of _open_video; __iter__ starts again at 0
            self._open_video(videos[0])

    def __len__(self) -> int:
        return self.nf

    def __iter__(self):
        self.count = 0
        return self

    def _where(self, path: str) -> str:
        return f"video {self.count + 1}/{self.nf} {path}"

    def _open_video(self, path: str) -> None:
        self.frame, self.frames_read = 0, 0
        self.cap = cv2.VideoCapture(path)
        opened = self.cap.isOpened()
        self.frames_expected = max(int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0) if opened else 0
        self.frames = self.frames_expected // self.vid_stride  # what _read_strided will yield
        self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 0.0
        if not opened:
            self._report(path, f"cannot be opened ({_why_unopenable(path)}); read 0 frames, skipped")

    def _report(self, path: str, reason: str) -> None:
        LOGGER.warning(f"{self._where(path)}: {reason}")
        self.unreadable.append(f"{path}: {reason}")

    def _read_strided(self) -> np.ndarray | None:
        """The next vid_stride-th frame of the open video (counting every frame read), or None."""
        for _ in range(self.vid_stride - 1):
            if not self.cap.grab():
                return None
            self.frames_read += 1
        ok, frame = self.cap.read()
        if not ok:
            return None
        self.frames_read += 1
        return frame

    def _check_video_end(self, path: str) -> None:
        """Warn when a video gave fewer frames than its container promised (or none at all)."""
        read, expected = self.frames_read, self.frames_expected
        if read == 0:
            promised = f" (its container reports {expected})" if expected else ""
            self._report(path, f"opened, but read 0 frames{promised}; skipped")
        elif read < expected:
            LOGGER.warning(f"{self._where(path)}: read {read} of {expected} frames (CAP_PROP_FRAME_COUNT); "
                           f"the rest could not be decoded, the file is truncated or corrupt")

    def _next_frame(self) -> tuple[str, np.ndarray] | None:
        """(path, frame) from the current video, moving on to the next video at the end; None when done."""
        while self.count < self.nf:
            path = self.files[self.count]
            if self.cap.isOpened():
                frame = self._read_strided()
                if frame is not None:
                    self.frame += 1
                    return path, frame
                self._check_video_end(path)
            self.cap.release()
            self.count += 1
            if self.count < self.nf:
                self._open_video(self.files[self.count])
        return None

    def _read_image(self, path: str) -> np.ndarray | None:
        im0 = cv2.imread(path)
        if im0 is None:
            LOGGER.warning(f"image {self.count}/{self.nf} {path}: cannot be decoded, skipped")
            self.unreadable.append(f"{path}: cannot be decoded as an image")
        return im0

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
                im0 = self._read_image(path)
                if im0 is None:
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
