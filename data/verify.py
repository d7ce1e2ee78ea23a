"""Finding images, checking images and YOLO label files, repairing what can be repaired.

The rules (design page, Data section): bad input never stops training. Each problem is either
repaired or the row/image is skipped, with one warning line naming the file and the reason:

  image   zero bytes, unreadable, unsupported format, truncated JPEG, under 10 px  -> image skipped
  label   no label file -> background image ("missing");  empty file -> background ("empty")
  row     wrong number of values, non-numeric or non-finite values, class id not an integer or out
          of range for the dataset's names, centre outside [0, 1] or width/height over 1, zero or
          negative width/height -> row skipped
          corners poking outside [0, 1] -> clipped;  duplicate rows -> removed;
          polygon rows (cls x1 y1 x2 y2 x3 y3 ...) -> converted to their enclosing box (kept as a
          segment for copy-paste)
  file    label file that has rows but none usable, or cannot be decoded -> image skipped
          (keeping it as a background would teach the model that its objects are background)

Counts are disjoint: found (image with >= 1 box), missing, empty, corrupt (image skipped).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from utils.boxes import segments2boxes, xywh2xyxy, xyxy2xywh
from utils.files import atomic_open

LOGGER = logging.getLogger(f"vitdet.{__name__}")
IMG_FORMATS = ("bmp", "jpeg", "jpg", "png", "tif", "tiff", "webp")  # what cv2.imread decodes
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv", "webm")
PIL_FORMATS = {"BMP", "JPEG", "MPO", "PNG", "TIFF", "WEBP"}  # image content we accept, by its header
MIN_IMAGE_SIDE = 10  # pixels; smaller images are skipped
ROUNDING_TOLERANCE = 1e-4  # corners this close outside [0, 1] are decimal rounding: clipped silently
LIST_IGNORED_SUFFIXES = (".npy",)  # our own disk image cache lives next to the images
EXIF_ORIENTATION = 274
EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


@dataclass
class FileCheck:
    """Outcome of checking one image and its label file.

    labels: (n, 5) float32 [cls, x, y, w, h] normalised; segments: [] or one (K, 2) normalised
    polygon per label row; shape: (w, h) as displayed (EXIF orientation applied).
    """

    im_file: str
    status: str  # found | missing | empty | corrupt
    shape: tuple[int, int] = (0, 0)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))
    segments: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


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


def check_image(im_file: str) -> tuple[tuple[int, int], str | None]:
    """((w, h), None) for a usable image, else ((0, 0), reason)."""
    if os.path.getsize(im_file) == 0:
        return (0, 0), "zero-byte file"
    try:
        with Image.open(im_file) as im:
            fmt = im.format
            im.verify()  # checks structure (PNG chunk CRCs, ...) without decoding pixels
        if fmt not in PIL_FORMATS:
            return (0, 0), f"unsupported image format {fmt}"
        shape = image_size(im_file)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return (0, 0), "truncated image file" if "runcated" in str(e) else f"cannot read image ({e})"
    if fmt in ("JPEG", "MPO"):
        with open(im_file, "rb") as f:
            f.seek(-2, os.SEEK_END)
            if f.read() != b"\xff\xd9":
                return (0, 0), "truncated JPEG (no end-of-image marker)"
    if min(shape) < MIN_IMAGE_SIDE:
        return (0, 0), f"image size {shape[0]}x{shape[1]} is under {MIN_IMAGE_SIDE} pixels"
    return shape, None


def _parse_row(values: list[str], nc: int | None) -> tuple[np.ndarray | None, np.ndarray | None, str, str]:
    """One label row -> (box [cls, x, y, w, h] or None, polygon (K, 2) or None, action, reason).

    action is '' (row fine), 'skipped' (box is None), 'clipped' or 'converted' (repaired, kept).
    """
    n = len(values)
    if n != 5 and (n < 7 or n % 2 == 0):
        return None, None, "skipped", "wrong number of values (expected 5, or class + >= 3 x y pairs)"
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None, None, "skipped", "non-numeric value"
    if not np.isfinite(numbers).all():
        return None, None, "skipped", "non-finite value"
    cls = numbers[0]
    if cls != int(cls) or cls < 0 or (nc is not None and cls >= nc):
        limit = f"0..{nc - 1} (the dataset has {nc} names)" if nc else ">= 0"
        return None, None, "skipped", f"class id not an integer in {limit}"
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
        return None, None, "skipped", "coordinates not normalised (centre outside [0, 1] or side > 1)"
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


def parse_label_file(lb_file: str, nc: int | None) -> tuple[np.ndarray, list[np.ndarray], list[str], int]:
    """Read a YOLO label file. Returns (labels (n, 5), segments, problem descriptions, rows read).

    segments is empty unless some row is a polygon; then every kept row has one (boxes as rectangles).
    Raises UnicodeDecodeError/OSError for a file that cannot be read as text.
    """
    with open(lb_file, encoding="utf-8") as f:
        rows = [(i + 1, line.split()) for i, line in enumerate(f) if line.strip()]
    boxes, polygons, lines, problems = [], [], [], defaultdict(list)
    for line_no, values in rows:
        box, polygon, action, reason = _parse_row(values, nc)
        if action:
            problems[(action, reason)].append(line_no)
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
    return labels, segments, messages, len(rows)


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
    shape, problem = check_image(im_file)
    if problem:
        return FileCheck(im_file, "corrupt", warnings=[f"{im_file}: image skipped: {problem}"])
    if not os.path.isfile(lb_file):
        return FileCheck(im_file, "missing", shape)
    try:
        labels, segments, messages, n_rows = parse_label_file(lb_file, nc)
    except (UnicodeDecodeError, OSError) as e:
        reason = f"label file cannot be read as text ({type(e).__name__})"
        return FileCheck(im_file, "corrupt", warnings=[f"{lb_file}: image skipped: {reason}"])
    warnings = [f"{lb_file}: {m}" for m in messages]
    if n_rows and not len(labels):
        warnings.append(f"{lb_file}: image skipped: no usable label row")
        return FileCheck(im_file, "corrupt", warnings=warnings)
    status = "found" if len(labels) else "empty"
    return FileCheck(im_file, status, shape, labels, segments, warnings)


# ----------------------------------------------------------------------------------------------
# The scan: every image checked (in a process pool), results cached next to the labels.

CACHE_VERSION = 1
STATUSES = ("found", "missing", "empty", "corrupt")
SERIAL_SCAN_BELOW = 64  # images; a pool costs more than it saves on fewer


class NoUsableImagesError(FileNotFoundError):
    """A dataset source in which no image survived verification."""


@dataclass
class ScanResult:
    """Usable images of a dataset source and what the scan found.

    shapes: (N, 2) int (w, h); labels: N arrays (n, 5) [cls, x, y, w, h] normalised;
    segments: N lists of (K, 2) normalised polygons (empty lists for box-only labels);
    counts: disjoint found/missing/empty/corrupt over every file the source named.
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


def cache_path(label_files: list[str]) -> Path:
    """labels/train/a.txt -> labels/train.cache (YOLOv5's place for it)."""
    return Path(label_files[0]).parent.with_suffix(".cache")


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
    }


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
        checks.append(FileCheck(im_file, str(arrays["status"][i]), shape, labels[i], segments, warnings))
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


def scan_dataset(
    path: str | Path | list, nc: int | None = None, prefix: str = "", workers: int | None = None
) -> ScanResult:
    """List, verify and (through the cache) read the labels of every image a dataset source names.

    nc: number of class names (class ids must be below it); None accepts any id >= 0.
    Logs one warning line per problem and one summary line; returns a ScanResult of the usable
    images. Raises FileNotFoundError for a missing source and NoUsableImagesError when nothing
    usable is left.
    """
    im_files, rejected = list_image_files(path, prefix)
    if not im_files:
        raise _no_images_error(path, rejected, [], prefix)
    label_files = img2label_paths(im_files)
    cache_file = cache_path(label_files)
    digest = files_hash(im_files + label_files, nc)
    checks = _load_cache(cache_file, digest)
    from_cache = checks is not None
    split = cache_file.with_suffix("")  # labels/train for labels/train.cache
    if checks is None:
        checks = _check_all(im_files, label_files, nc, f"{prefix}Scanning {split}", workers)
        _save_cache(cache_file, digest, checks, prefix)
    warnings = [f"{f}: image skipped: {why}" for f, why in rejected] + [w for c in checks for w in c.warnings]
    for line in warnings:
        LOGGER.warning(f"{prefix}{line}")
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    counts["corrupt"] += len(rejected)
    LOGGER.info(
        f"{prefix}Scanned {split}{' (cache)' if from_cache else ''}: {counts['found']} found, "
        f"{counts['missing']} missing (backgrounds), {counts['empty']} empty, {counts['corrupt']} corrupt"
    )
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
    )
