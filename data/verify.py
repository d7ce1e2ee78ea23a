"""Finding images, checking images and YOLO label files, repairing what can be repaired.

The rules (design page, Data section): bad input never stops training. Each problem is either
repaired or the row/image is skipped, with one warning line naming the file and the reason:

  image   zero bytes, unreadable, unsupported format, truncated JPEG, JPEG data the decoder reports
          as corrupt (e.g. cut and closed with an end marker: half the image would be grey), under
          10 px -> image skipped;  bytes after a JPEG's end-of-image marker -> kept (the decoder
          ignores them; the file is not rewritten)
  label   no label file -> background image ("missing");  empty file -> background ("empty")
  row     wrong number of values, non-numeric or non-finite values, class id not an integer or out
          of range for the dataset's names, centre outside [0, 1] or width/height over 1, zero or
          negative width/height -> row skipped
          corners poking outside [0, 1] -> clipped;  duplicate rows -> removed;
          polygon rows (cls x1 y1 x2 y2 x3 y3 ...) -> converted to their enclosing box (kept as a
          segment for copy-paste)
  file    label file that has rows but none usable, or cannot be decoded -> image skipped
          (keeping it as a background would teach the model that its objects are background)

Counts are disjoint: found (image with >= 1 box), missing, empty, corrupt (image skipped). Label
rows dropped (skipped or removed) are counted by reason in a second summary line. One exception to
"never stops": a source that loses more than half of its label rows to one reason raises
MostLabelsDroppedError. That is a mistake in the dataset (a `names` list shorter than the class
ids, labels in pixels), not a few bad files, and training on the rest would quietly be wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from utils.boxes import segments2boxes, xywh2xyxy, xyxy2xywh
from utils.files import atomic_open

LOGGER = logging.getLogger(f"vitdet.{__name__}")
IMG_FORMATS = ("bmp", "jpeg", "jpg", "png", "tif", "tiff", "webp")  # what cv2.imread decodes
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv", "webm")
PIL_FORMATS = {"BMP", "JPEG", "MPO", "PNG", "TIFF", "WEBP"}  # image content we accept, by its header
WRONG_COUNT = "wrong number of values (expected 5, or class + >= 3 x y pairs)"
NOT_NORMALISED = "coordinates not normalised (centre outside [0, 1] or side > 1)"
DROP_HINTS = {  # what a source losing most of its rows to this reason probably got wrong
    WRONG_COUNT: "YOLO label rows are 'class x_centre y_centre width height' (or a polygon 'class x1 y1 "
    "x2 y2 x3 y3 ...'); these files hold another format: convert them.",
    NOT_NORMALISED: "YOLO label rows are normalised to [0, 1] by the image size; these look like pixel "
    "coordinates (or another box format): convert them.",
}
DROP_ACTIONS = ("skipped", "removed")  # row actions that lose a box (clipped/converted keep it)
MIN_IMAGE_SIDE = 10  # pixels; smaller images are skipped
ROUNDING_TOLERANCE = 1e-4  # corners this close outside [0, 1] are decimal rounding: clipped silently
LIST_IGNORED_SUFFIXES = (".npy",)  # our own disk image cache lives next to the images
EXIF_ORIENTATION = 274
EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
JPEG_END = b"\xff\xd9"  # end-of-image marker
# libjpeg reports damaged entropy-coded data only as a warning on stderr that names no file, and
# fills what is missing with grey (jerror.h, JWRN_*). These warnings mean pixels were lost ...
JPEG_DATA_LOST = ("Corrupt JPEG data", "Premature end of JPEG file", "Inconsistent progression",
                  "Invalid SOS")  # fmt: skip
# ... except these, where libjpeg skipped bytes between segments and the image is complete.
JPEG_PIXELS_INTACT = ("extraneous bytes before marker", "bad ICC marker")
# Decoding at 1/8 scale still entropy-decodes every block (where corruption shows) but skips most
# of the inverse DCT and the colour conversion: about 2.5x cheaper than a full decode.
JPEG_PROBE_FLAGS = cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION
_STDERR_LOCK = threading.Lock()  # file descriptor 2 is per process: one capture at a time


@dataclass
class FileCheck:
    """Outcome of checking one image and its label file.

    labels: (n, 5) float32 [cls, x, y, w, h] normalised; segments: [] or one (K, 2) normalised
    polygon per label row; shape: (w, h) as displayed (EXIF orientation applied); rows: non-blank
    label rows read; dropped: {reason: rows skipped or removed}; largest_bad_class: the largest
    integer class id among rows skipped for their class id (-1 if none).
    """

    im_file: str
    status: str  # found | missing | empty | corrupt
    shape: tuple[int, int] = (0, 0)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))
    segments: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    rows: int = 0
    dropped: dict = field(default_factory=dict)
    largest_bad_class: int = -1


def img2label_paths(img_paths: list[str]) -> list[str]:
    """Label file of each image: the last '/images/' becomes '/labels/', the suffix becomes .txt."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [labels.join(p.rsplit(images, 1)).rsplit(".", 1)[0] + ".txt" for p in img_paths]


def _read_list_file(list_file: Path) -> list[str]:
    """Paths listed in a .txt file, one per line; relative ones are relative to the file's folder."""
    entries = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(os.path.abspath(os.path.join(list_file.parent, line)))
    return entries


def _candidate_files(path: str | Path, prefix: str) -> tuple[list[str], bool]:
    """All files under one source; the flag says they came from a list file (each must be an image)."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = (str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return sorted(os.path.abspath(f) for f in found), False
    if p.is_file() and p.suffix.lower() == ".txt":
        return _read_list_file(p), True
    if p.is_file():
        return [os.path.abspath(p)], True
    raise FileNotFoundError(f"{prefix}{p} does not exist (expected an image folder, a .txt list or an image)")


def list_image_files(path: str | Path | list, prefix: str = "") -> tuple[list[str], list[tuple[str, str]]]:
    """Images named by a folder (searched recursively), a .txt list of paths, an image, or a list of those.

    Returns (sorted absolute image paths, [(file, reason)] for entries that are not usable images:
    unsupported suffixes and list entries that do not exist). Paths are absolute but symlinks are
    kept, so labels are looked up next to the link. Raises FileNotFoundError for a missing source.
    """
    sources = path if isinstance(path, (list, tuple)) else [path]
    images, rejected = [], []
    for source in sources:
        files, listed = _candidate_files(source, prefix)
        for f in files:
            suffix = f.rsplit(".", 1)[-1].lower() if "." in os.path.basename(f) else ""
            if f.endswith(LIST_IGNORED_SUFFIXES):
                continue
            if suffix not in IMG_FORMATS:
                rejected.append((f, f"unsupported format '.{suffix}' (supported: {', '.join(IMG_FORMATS)})"))
            elif listed and not os.path.isfile(f):
                rejected.append((f, f"listed in {source} but does not exist"))
            else:
                images.append(f)
    return sorted(set(images)), rejected


def image_size(im_file: str) -> tuple[int, int]:
    """(w, h) of an image as displayed, from its header (EXIF orientation applied)."""
    with Image.open(im_file) as im:
        w, h = im.size
        if im.getexif().get(EXIF_ORIENTATION) in EXIF_TRANSPOSED:
            w, h = h, w
    return w, h


class ImageCheck(NamedTuple):
    """Outcome of checking one image file: shape (w, h), or (0, 0) with the reason to skip it;
    note: a repair of a kept image, said once in a warning."""

    shape: tuple[int, int]
    problem: str | None = None
    note: str | None = None


def check_image(im_file: str) -> ImageCheck:
    """Header, structure and (for JPEG) decoder check of one image; see the module docstring."""
    if os.path.getsize(im_file) == 0:
        return ImageCheck((0, 0), "zero-byte file")
    try:
        with Image.open(im_file) as im:
            fmt = im.format
            im.verify()  # checks structure (PNG chunk CRCs, ...) without decoding pixels
        if fmt not in PIL_FORMATS:
            return ImageCheck((0, 0), f"unsupported image format {fmt}")
        shape = image_size(im_file)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = "truncated image file" if "runcated" in str(e) else f"cannot read image ({e})"
        return ImageCheck((0, 0), reason)
    if min(shape) < MIN_IMAGE_SIDE:
        return ImageCheck((0, 0), f"image size {shape[0]}x{shape[1]} is under {MIN_IMAGE_SIDE} pixels")
    if fmt in ("JPEG", "MPO"):
        with open(im_file, "rb") as f:
            problem, note = check_jpeg_data(f.read())
        if problem:
            return ImageCheck((0, 0), problem)
        return ImageCheck(shape, None, note)
    return ImageCheck(shape)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Lines that C code writes to file descriptor 2 inside the block (filled in when it ends).

    Process-wide: a line another thread writes meanwhile is captured too. The scan decodes in its
    own pool processes, or in the main thread before training starts, so nothing else decodes then.
    """
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:
        if sys.stderr is not None:
            sys.stderr.flush()  # text Python already buffered belongs to the real stderr
        try:
            saved = os.dup(2)
        except OSError:  # no file descriptor 2 at all (a detached process): nothing to capture
            yield lines
            return
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            lines += [line.strip() for line in text.splitlines() if line.strip()]


def decode_jpeg(data: bytes) -> tuple[bool, list[str]]:
    """Decode JPEG bytes with OpenCV's libjpeg, as training will: (decoded at all, decoder messages).

    libjpeg prints only its first warning of an image, so the messages hold at most one of its lines.
    """
    with _captured_stderr() as messages:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_PROBE_FLAGS) is not None
    return decoded, messages


def _pixels_lost(message: str) -> bool:
    return any(k in message for k in JPEG_DATA_LOST) and not any(k in message for k in JPEG_PIXELS_INTACT)


def check_jpeg_data(data: bytes) -> tuple[str | None, str | None]:
    """(reason to skip, note on a kept image) for the bytes of a JPEG file.

    A cut file closed with FF D9 has a complete structure: only decoding finds that its entropy-coded
    data stops early. Bytes after the end-of-image marker (camera trailers, junk) are ignored by the
    decoder, so the image is kept as it is (YOLOv5 rewrites such files; we leave the dataset alone).
    """
    decoded, messages = decode_jpeg(data)
    said = "; ".join(messages)[:200]  # what libjpeg printed without a file name, now with one
    if not decoded:
        if not data.endswith(JPEG_END):
            return "truncated JPEG (no end-of-image marker)", None
        return f"JPEG data cannot be decoded{f' (decoder: {said})' if said else ''}", None
    if any(_pixels_lost(m) for m in messages):
        return f"corrupt JPEG data (decoder: {said}), part of the image would be grey", None
    notes = [f"decoder: {said}, image complete"] if messages else []
    if not data.endswith(JPEG_END):
        notes.append("data after the JPEG end-of-image marker is ignored")
    return None, "; ".join(notes) or None


def class_id_reason(nc: int | None) -> str:
    """Why a row's class id is refused (the same text for every row of a scan: nc is fixed)."""
    limit = f"0..{nc - 1} (the dataset has {nc} name{'s' if nc != 1 else ''})" if nc else ">= 0"
    return f"class id not an integer in {limit}"


def _parse_row(values: list[str], nc: int | None) -> tuple[np.ndarray | None, np.ndarray | None, str, str]:
    """One label row -> (box [cls, x, y, w, h] or None, polygon (K, 2) or None, action, reason).

    action is '' (row fine), 'skipped' (box is None), 'clipped' or 'converted' (repaired, kept).
    """
    n = len(values)
    if n != 5 and (n < 7 or n % 2 == 0):
        return None, None, "skipped", WRONG_COUNT
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None, None, "skipped", "non-numeric value"
    if not np.isfinite(numbers).all():
        return None, None, "skipped", "non-finite value"
    cls = numbers[0]
    if cls != int(cls) or cls < 0 or (nc is not None and cls >= nc):
        return None, None, "skipped", class_id_reason(nc)
    if n == 5:
        return _check_box(cls, numbers[1:])
    polygon = numbers[1:].reshape(-1, 2).clip(0, 1)
    box = segments2boxes([polygon])[0]
    if box[2] <= 0 or box[3] <= 0:
        return None, None, "skipped", "zero-area polygon"
    return np.array([cls, *box], dtype=np.float32), polygon.astype(np.float32), "converted", "polygon to box"


def _check_box(cls: float, xywh: np.ndarray) -> tuple[np.ndarray | None, None, str, str]:
    x, y, w, h = xywh
    if w <= 0 or h <= 0:
        return None, None, "skipped", "zero or negative width/height"
    if not (0 <= x <= 1 and 0 <= y <= 1) or w > 1 or h > 1:
        return None, None, "skipped", NOT_NORMALISED
    corners = xywh2xyxy(xywh[None])[0]
    clipped = corners.clip(0, 1)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, None, "skipped", "zero-area box after clipping to [0, 1]"
    box = np.array([cls, *xyxy2xywh(clipped[None])[0]], dtype=np.float32)
    if np.abs(clipped - corners).max() > ROUNDING_TOLERANCE:
        return box, None, "clipped", "corners outside [0, 1]"
    return box, None, "", ""


def _describe(action: str, lines: list[int], reason: str) -> str:
    shown = ", ".join(str(r) for r in lines[:10]) + (", ..." if len(lines) > 10 else "")
    return f"{action} {len(lines)} row{'s' if len(lines) > 1 else ''} ({reason}): line {shown}"


@dataclass
class LabelFile:
    """A parsed YOLO label file: labels (n, 5) [cls, x, y, w, h] normalised; segments: [] unless some
    row is a polygon, then one (K, 2) polygon per kept row (boxes as rectangles); messages: one
    description per problem; rows: non-blank rows read; dropped: {reason: rows skipped or removed};
    largest_bad_class: largest integer class id among rows refused for their class id (-1 if none)."""

    labels: np.ndarray
    segments: list[np.ndarray]
    messages: list[str]
    rows: int
    dropped: dict[str, int]
    largest_bad_class: int


def parse_label_file(lb_file: str, nc: int | None) -> LabelFile:
    """Read a YOLO label file. Raises UnicodeDecodeError/OSError for a file that cannot be read as text."""
    with open(lb_file, encoding="utf-8") as f:
        rows = [(i + 1, line.split()) for i, line in enumerate(f) if line.strip()]
    boxes, polygons, lines, problems = [], [], [], defaultdict(list)
    largest_bad_class, bad_class = -1, class_id_reason(nc)
    for line_no, values in rows:
        box, polygon, action, reason = _parse_row(values, nc)
        if action:
            problems[(action, reason)].append(line_no)
        if reason == bad_class:
            largest_bad_class = max(largest_bad_class, _integer_class_id(values[0]))
        if box is not None:
            boxes.append(box)
            polygons.append(polygon)
            lines.append(line_no)
    labels = np.array(boxes, dtype=np.float32).reshape(-1, 5)
    labels, keep = _drop_duplicates(labels)
    if len(keep) < len(boxes):
        problems[("removed", "duplicate")] = sorted(set(lines) - {lines[i] for i in keep})
    segments = []
    if any(p is not None for p in polygons):
        segments = [polygons[i] if polygons[i] is not None else _box_polygon(b) for i, b in zip(keep, labels)]
    messages = [_describe(action, found, reason) for (action, reason), found in problems.items()]
    dropped = {reason: len(found) for (action, reason), found in problems.items() if action in DROP_ACTIONS}
    return LabelFile(labels, segments, messages, len(rows), dropped, largest_bad_class)


def _integer_class_id(text: str) -> int:
    """The class id a row names if it is a whole number >= 0 (an id past the names), else -1."""
    value = float(text)
    return int(value) if value == int(value) and value >= 0 else -1


def _drop_duplicates(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Remove repeated rows, keeping the first of each in file order."""
    _, first = np.unique(labels, axis=0, return_index=True)
    keep = sorted(first.tolist())
    return labels[keep], keep


def _box_polygon(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = xywh2xyxy(box[None, 1:5])[0]
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32)


def verify_image_label(args: tuple[str, str, int | None]) -> FileCheck:
    """Check one (image, label file, number of classes); one tuple argument so it maps over a pool."""
    im_file, lb_file, nc = args
    shape, problem, note = check_image(im_file)
    if problem:
        return FileCheck(im_file, "corrupt", warnings=[f"{im_file}: image skipped: {problem}"])
    kept = [f"{im_file}: image kept: {note}"] if note else []
    if not os.path.isfile(lb_file):
        return FileCheck(im_file, "missing", shape, warnings=kept)
    try:
        parsed = parse_label_file(lb_file, nc)
    except (UnicodeDecodeError, OSError) as e:
        reason = f"label file cannot be read as text ({type(e).__name__})"
        return FileCheck(im_file, "corrupt", warnings=[f"{lb_file}: image skipped: {reason}"])
    warnings = kept + [f"{lb_file}: {m}" for m in parsed.messages]
    counted = dict(rows=parsed.rows, dropped=parsed.dropped, largest_bad_class=parsed.largest_bad_class)
    if parsed.rows and not len(parsed.labels):
        warnings.append(f"{lb_file}: image skipped: no usable label row")
        return FileCheck(im_file, "corrupt", warnings=warnings, **counted)
    status = "found" if len(parsed.labels) else "empty"
    return FileCheck(im_file, status, shape, parsed.labels, parsed.segments, warnings, **counted)


# ----------------------------------------------------------------------------------------------
# The scan: every image checked (in a process pool), results cached next to the labels.

CACHE_VERSION = 2  # 2: row counts, dropped rows by reason, largest refused class id
MOST_DROPPED = 0.5  # a source losing more than this fraction of its label rows to one reason stops
STATUSES = ("found", "missing", "empty", "corrupt")
SERIAL_SCAN_BELOW = 64  # images; a pool costs more than it saves on fewer


class NoUsableImagesError(FileNotFoundError):
    """A dataset source in which no image survived verification."""


class MostLabelsDroppedError(ValueError):
    """A dataset source that lost more than half of its label rows to one reason (see scan_dataset)."""


@dataclass
class ScanResult:
    """Usable images of a dataset source and what the scan found.

    shapes: (N, 2) int (w, h); labels: N arrays (n, 5) [cls, x, y, w, h] normalised;
    segments: N lists of (K, 2) normalised polygons (empty lists for box-only labels);
    counts: disjoint found/missing/empty/corrupt over every file the source named; rows: label rows
    read (of images whose image file is usable); dropped: {reason: rows skipped or removed}.
    """

    im_files: list[str]
    label_files: list[str]
    shapes: np.ndarray
    labels: list[np.ndarray]
    segments: list[list[np.ndarray]]
    counts: dict[str, int]
    warnings: list[str]
    cache_file: Path
    from_cache: bool
    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


CACHE_SUFFIX = ".vitdet.cache"


def cache_path(label_files: list[str]) -> Path:
    """labels/train/a.txt -> labels/train.vitdet.cache. Not YOLOv5's labels/train.cache: users keep
    YOLOv5 on the same dataset, and each project would overwrite the other's cache (neither can read
    the other's format) and rescan on every run."""
    label_dir = Path(label_files[0]).parent
    return label_dir.with_name(label_dir.name + CACHE_SUFFIX)


def files_hash(files: list[str], nc: int | None) -> str:
    """Digest of paths, sizes and modification times (a label edited in place changes it), the
    number of classes (it decides which class ids are valid) and the cache format version."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} nc={nc}\n".encode())
    for f in files:
        try:
            st = os.stat(f)
            digest.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{f}|absent\n".encode())
    return digest.hexdigest()


def _pack(checks: list[FileCheck]) -> dict[str, np.ndarray]:
    """Check results -> flat numeric/unicode arrays (an .npz that loads without pickle)."""
    segments = [s for c in checks for s in c.segments]
    return {
        "im_files": np.array([c.im_file for c in checks], dtype=str),
        "status": np.array([c.status for c in checks], dtype=str),
        "shapes": np.array([c.shape for c in checks], dtype=np.int64).reshape(-1, 2),
        "n_labels": np.array([len(c.labels) for c in checks], dtype=np.int64),
        "labels": np.concatenate([c.labels for c in checks]).astype(np.float32),
        "n_segments": np.array([len(c.segments) for c in checks], dtype=np.int64),
        "segment_sizes": np.array([len(s) for s in segments], dtype=np.int64),
        "points": np.concatenate(segments or [np.zeros((0, 2))]).astype(np.float32),
        "warnings": np.array(["\n".join(c.warnings) for c in checks], dtype=str),
        "rows": np.array([c.rows for c in checks], dtype=np.int64),
        "dropped": np.array([_dropped_text(c.dropped) for c in checks], dtype=str),
        "largest_bad_class": np.array([c.largest_bad_class for c in checks], dtype=np.int64),
    }


def _dropped_text(dropped: dict[str, int]) -> str:
    """{reason: rows} -> 'reason<TAB>rows' lines (reasons hold neither tabs nor newlines)."""
    return "\n".join(f"{reason}\t{n}" for reason, n in dropped.items())


def _dropped_dict(text: str) -> dict[str, int]:
    pairs = (line.rsplit("\t", 1) for line in text.split("\n") if line)
    return {reason: int(n) for reason, n in pairs}


def _split(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []


def _unpack(arrays) -> list[FileCheck]:
    labels = _split(arrays["labels"], arrays["n_labels"])
    points = iter(_split(arrays["points"], arrays["segment_sizes"]))
    checks = []
    for i, im_file in enumerate(arrays["im_files"].tolist()):
        segments = [next(points) for _ in range(int(arrays["n_segments"][i]))]
        warnings = [w for w in str(arrays["warnings"][i]).split("\n") if w]
        shape = tuple(int(v) for v in arrays["shapes"][i])
        status = str(arrays["status"][i])
        counted = dict(rows=int(arrays["rows"][i]), dropped=_dropped_dict(str(arrays["dropped"][i])),
                       largest_bad_class=int(arrays["largest_bad_class"][i]))  # fmt: skip
        checks.append(FileCheck(im_file, status, shape, labels[i], segments, warnings, **counted))
    return checks


def _load_cache(cache_file: Path, digest: str) -> list[FileCheck] | None:
    """The cached checks if the cache matches the files and format, else None."""
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if int(z["version"][0]) != CACHE_VERSION or str(z["hash"][0]) != digest:
                return None
            return _unpack(z)
    except (OSError, KeyError, ValueError, IndexError, EOFError, zipfile.BadZipFile):
        return None


def _save_cache(cache_file: Path, digest: str, checks: list[FileCheck], prefix: str) -> None:
    """Write atomically (temp file + rename); an unwritable folder only costs a warning."""
    arrays = _pack(checks) | {"version": np.array([CACHE_VERSION]), "hash": np.array([digest])}
    try:
        with atomic_open(cache_file, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        LOGGER.warning(f"{prefix}label cache not saved, {cache_file.parent} is not writeable ({e})")


def _pool_size(n: int, workers: int | None) -> int:
    if n < SERIAL_SCAN_BELOW or multiprocessing.current_process().daemon:
        return 0  # daemonic processes (DataLoader workers) cannot start a pool
    return min(workers or 8, os.cpu_count() or 1)


def _check_all(im_files: list[str], label_files: list[str], nc: int | None, desc: str, workers) -> list:
    jobs = [(im, lb, nc) for im, lb in zip(im_files, label_files)]
    show = int(os.environ.get("RANK", -1)) <= 0  # one progress bar under DDP
    n_procs = _pool_size(len(jobs), workers)
    if n_procs <= 1:
        return [verify_image_label(j) for j in tqdm(jobs, desc=desc, disable=not show)]
    with multiprocessing.Pool(n_procs) as pool:
        results = pool.imap(verify_image_label, jobs, chunksize=16)
        return list(tqdm(results, total=len(jobs), desc=desc, disable=not show))


def _no_images_error(path, rejected: list, corrupt: list[FileCheck], prefix: str) -> NoUsableImagesError:
    reasons = [f"{f}: {why}" for f, why in rejected] + [w for c in corrupt for w in c.warnings]
    listed = len(rejected) + len(corrupt)
    detail = "; ".join(reasons[:5]) + ("; ..." if len(reasons) > 5 else "")
    if not listed:
        return NoUsableImagesError(f"{prefix}No images found in {path} (supported: {', '.join(IMG_FORMATS)})")
    return NoUsableImagesError(
        f"{prefix}No usable images in {path}: {listed} files found, all skipped ({detail})"
    )


def _cached_checks(
    im_files: list[str], label_files: list[str], nc: int | None, prefix: str, workers: int | None
) -> tuple[list[FileCheck], Path, bool]:
    """(checks of every image, cache file, whether they came from it); checks and saves when stale."""
    cache_file = cache_path(label_files)
    digest = files_hash(im_files + label_files, nc)
    checks = _load_cache(cache_file, digest)
    if checks is not None:
        return checks, cache_file, True
    checks = _check_all(im_files, label_files, nc, f"{prefix}Scanning {cache_file.with_suffix('')}", workers)
    _save_cache(cache_file, digest, checks, prefix)
    return checks, cache_file, False


def _dropped_rows(checks: list[FileCheck]) -> tuple[int, dict[str, int]]:
    """(label rows read, {reason: rows dropped}, most frequent reason first) over a whole source."""
    dropped = Counter()
    for c in checks:
        dropped.update(c.dropped)
    return sum(c.rows for c in checks), dict(dropped.most_common())


def _log_summary(
    counts: dict[str, int], rows: int, dropped: dict[str, int], split: Path, from_cache: bool, prefix: str
) -> None:
    """Log the dropped label rows by reason (when any), then the image counts (the last line)."""
    if dropped:
        by_reason = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        LOGGER.info(f"{prefix}Labels {split}: dropped {sum(dropped.values())} of {rows} boxes: {by_reason}")
    LOGGER.info(
        f"{prefix}Scanned {split}{' (cache)' if from_cache else ''}: {counts['found']} found, "
        f"{counts['missing']} missing (backgrounds), {counts['empty']} empty, {counts['corrupt']} corrupt"
    )


def _most_dropped_error(
    where: str, rows: int, dropped: dict[str, int], largest: int, nc: int | None, names_source: str | None
) -> MostLabelsDroppedError | None:
    """The error for a source that lost more than MOST_DROPPED of its `rows` to one reason, else None.

    dropped: {reason: rows}, most frequent first; largest: the largest class id refused as out of range.
    """
    reason, n = next(iter(dropped.items()), ("", 0))
    if n <= MOST_DROPPED * rows:
        return None
    head = f"{where}: {n} of {rows} boxes ({100 * n / rows:.0f}%) are dropped for one reason: {reason}."
    if reason == class_id_reason(nc) and nc and largest >= nc:
        entries = f"{nc} entr{'y' if nc == 1 else 'ies'}"
        hint = (
            f"The dataset YAML's `names` likely does not match the labels: `names` in "
            f"{names_source or 'the dataset YAML'} has {entries}, the largest class id in the labels is "
            f"{largest}. Give `names` one entry per class id 0..{largest}, or fix the labels."
        )
    else:
        hint = DROP_HINTS.get(reason, "See the warnings above for the files and lines.")
    return MostLabelsDroppedError(f"{head} {hint}")


def scan_dataset(
    path: str | Path | list,
    nc: int | None = None,
    prefix: str = "",
    workers: int | None = None,
    names_source: str | None = None,
) -> ScanResult:
    """List, verify and (through the cache) read the labels of every image a dataset source names.

    nc: number of class names (class ids must be below it); None accepts any id >= 0.
    names_source: where the names came from (the dataset YAML), named when the class ids do not fit.
    Logs one warning line per problem, then the dropped label rows by reason and the image counts;
    returns a ScanResult of the usable images. Raises FileNotFoundError for a missing source,
    MostLabelsDroppedError when one reason drops more than half of the label rows, and
    NoUsableImagesError when nothing usable is left.
    """
    im_files, rejected = list_image_files(path, prefix)
    if not im_files:
        raise _no_images_error(path, rejected, [], prefix)
    label_files = img2label_paths(im_files)
    checks, cache_file, from_cache = _cached_checks(im_files, label_files, nc, prefix, workers)
    split = cache_file.with_name(cache_file.name[: -len(CACHE_SUFFIX)])  # labels/train
    warnings = [f"{f}: image skipped: {why}" for f, why in rejected] + [w for c in checks for w in c.warnings]
    for line in warnings:
        LOGGER.warning(f"{prefix}{line}")
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    counts["corrupt"] += len(rejected)
    rows, dropped = _dropped_rows(checks)
    _log_summary(counts, rows, dropped, split, from_cache, prefix)
    largest = max(c.largest_bad_class for c in checks)
    error = _most_dropped_error(f"{prefix}{split}", rows, dropped, largest, nc, names_source)
    if error is not None:
        raise error
    usable = [(c, lb) for c, lb in zip(checks, label_files) if c.status != "corrupt"]
    if not usable:
        raise _no_images_error(path, rejected, checks, prefix)
    return ScanResult(
        im_files=[c.im_file for c, _ in usable],
        label_files=[lb for _, lb in usable],
        shapes=np.array([c.shape for c, _ in usable], dtype=np.int64).reshape(-1, 2),
        labels=[c.labels for c, _ in usable],
        segments=[c.segments for c, _ in usable],
        counts=counts,
        warnings=warnings,
        cache_file=cache_file,
        from_cache=from_cache,
        rows=rows,
        dropped=dropped,
    )
