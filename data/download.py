"""Datasets by name: fetch the archives a dataset YAML lists, verify them, extract them safely.

A dataset YAML declares its archives as data, never as code:

    download:
      - url: https://example.org/coco128.zip
        sha256: 0f3c...      # optional: without it the download is reported 'unverified' and the
        size: 6984509        # optional, bytes     YAML's `expected` counts are what is checked
    expected:                # optional: images and label files per split once the data are ready
      train: {images: 128, labels: 126}

check_dataset (data/config.py) puts the data in `$VITDET_DATASETS/<yaml stem>/` (the YAML's `path`,
if it has one): each archive is fetched (standard-library urllib, a tqdm progress bar) into a hidden
temporary file that is renamed to its own name only when the bytes are all there and the hash
matches; all archives are extracted into one temporary folder inside the dataset folder and moved
into place; the YAML's `convert:` step runs (its `source` relative to the dataset folder); the
expected counts are checked; a completion marker is written last. A dataset folder without the
marker is never taken as ready: the next run extracts (and converts) again, reusing the archives
already downloaded and verified.

Extraction refuses, before writing anything: absolute paths, '..' components, links whose target
leaves the folder, device files and FIFOs, and archives that would unpack to more than
MAX_EXTRACT_BYTES (or MAX_EXTRACT_RATIO times their own size). While writing it also refuses to
follow a link out of the folder and counts the bytes really written.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from utils.files import atomic_path, atomic_write_text, temp_name_beside

LOGGER = logging.getLogger(f"vitdet.{__name__}")
MARKER = ".vitdet-complete"  # written last: its presence means the dataset folder is ready
LOCK = ".vitdet-lock"
MAX_EXTRACT_BYTES = 64 << 30  # 64 GiB: above COCO 2017 (about 20 GiB unpacked)
MAX_EXTRACT_RATIO = 100  # unpacked size / archive size; image archives are close to 1
CHUNK = 1 << 20
TIMEOUT_S = 60
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(OSError):
    """A dataset archive could not be fetched, verified or extracted; the message says what to do."""

    def __init__(self, message: str):
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class UnsafeArchiveError(DownloadError):
    """An archive entry would land outside the dataset folder, or the archive is too large unpacked."""


@dataclass(frozen=True)
class Archive:
    """One entry of a YAML's `download:` list. `name`: the file name it is stored under."""

    url: str
    name: str
    sha256: str | None = None
    size: int | None = None  # bytes


# ------------------------------------------------------------------------------------- the YAML list
def parse_archives(spec, source: str) -> list[Archive]:
    """`download:` (a list of {url, sha256?, size?} mappings) -> Archives; ValueError naming the entry."""
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"{source}: 'download' must be a non-empty list of {{url, sha256, size}} mappings")
    archives = [_parse_entry(entry, f"{source}: download[{i}]") for i, entry in enumerate(spec)]
    names = [a.name for a in archives]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: two download entries have the same file name ({names})")
    return archives


def _parse_entry(entry, where: str) -> Archive:
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise ValueError(f"{where}: expected a mapping with a 'url' string, got {entry!r}")
    unknown = sorted(set(entry) - {"url", "sha256", "size", "name"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: url, sha256, size, name)")
    url = entry["url"]
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"{where}: url must start with https:// or http://, got {url!r}")
    name = str(entry.get("name") or PurePosixPath(urllib.request.url2pathname(url.split("?")[0])).name)
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"{where}: cannot store {url!r} under the file name {name!r}; give a plain 'name'")
    sha = entry.get("sha256")
    if sha is not None and not _SHA256.match(str(sha).lower()):
        raise ValueError(f"{where}: sha256 must be 64 hex digits, got {sha!r}")
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"{where}: size must be a positive number of bytes, got {size!r}")
    return Archive(url, name, str(sha).lower() if sha else None, size)


# ------------------------------------------------------------------------------ completion marker
def _marker_text(archives: list[Archive]) -> str:
    return json.dumps([{"url": a.url, "sha256": a.sha256} for a in archives], indent=1) + "\n"


def is_complete(root: Path, archives: list[Archive]) -> bool:
    """True when `root` holds a finished preparation of exactly these archives."""
    marker = Path(root) / MARKER
    return marker.is_file() and marker.read_text(encoding="utf-8") == _marker_text(archives)


def mark_complete(root: Path, archives: list[Archive]) -> None:
    """The last step of a preparation: from now on `root` is used as it is."""
    atomic_write_text(Path(root) / MARKER, _marker_text(archives))


def clear_marker(root: Path) -> None:
    (Path(root) / MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def preparation_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on `root` while it is prepared, so that two processes (DDP ranks, two
    commands) asking for the same dataset at once prepare it once; the second then finds it ready."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one command at a time)
        yield
        return
    with open(root / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------- downloading
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _by_hand(archive: Archive, target: Path) -> str:
    expected = f"sha256 {archive.sha256}" if archive.sha256 else "no sha256 given in the YAML"
    return f"to continue without the network, download it by other means and put it at {target} ({expected})"


def ensure_archive(archive: Archive, folder: Path, progress: bool = True) -> Path:
    """The verified archive file in `folder`: one put there earlier (by a run or by hand), or a new
    download."""
    target = Path(folder) / archive.name
    if target.is_file():
        if archive.sha256:
            actual = file_sha256(target)
            if actual != archive.sha256:
                raise DownloadError(
                    f"{target} (for {archive.url}) has the wrong sha256: expected {archive.sha256}, actual "
                    f"{actual}. Delete it to download it again, or replace it with the right file.")
        LOGGER.info(f"Using {target} (already downloaded)")
        return target
    return download(archive, target, progress)


def download(archive: Archive, target: Path, progress: bool = True) -> Path:
    """Fetch archive.url into `target` atomically (a temporary name until complete and verified)."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    LOGGER.info(f"Downloading {archive.url} to {target}")
    digest = hashlib.sha256()
    try:
        with atomic_path(target) as tmp, _open_url(archive, target) as response:
            announced = int(response.headers.get("Content-Length") or 0) or archive.size
            with open(tmp, "xb") as f, tqdm(total=announced, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc=archive.name, disable=not progress) as bar:
                received = _copy(response.read, f, bar.update, digest)
            _check_download(archive, target, received, announced, digest.hexdigest())
    except (OSError, http.client.HTTPException) as err:
        if isinstance(err, DownloadError):
            raise
        raise DownloadError(f"could not download {archive.url}: {err}; {_by_hand(archive, target)}") from None
    if not archive.sha256:
        LOGGER.warning(f"{archive.url}: the YAML gives no sha256, so this download is unverified "
                       "(the YAML's expected image and label counts are checked after extraction)")
    return target


@contextlib.contextmanager
def _open_url(archive: Archive, target: Path) -> Iterator[http.client.HTTPResponse]:
    request = urllib.request.Request(archive.url, headers={"User-Agent": "vitdet-dataset-download"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"could not download {archive.url}: HTTP {err.code} {err.reason}; "
                            f"{_by_hand(archive, target)}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not download {archive.url} (offline? {reason}); "
                            f"{_by_hand(archive, target)}") from None
    with response:
        yield response


def _copy(read: Callable[[int], bytes], out: IO[bytes], advance: Callable[[int], object],
          digest=None, limit: int | None = None, what: str = "") -> int:
    """Copy blocks from read() to out until EOF; returns the bytes copied (UnsafeArchiveError over limit)."""
    total = 0
    for block in iter(lambda: read(CHUNK), b""):
        total += len(block)
        if limit is not None and total > limit:
            raise UnsafeArchiveError(f"{what}: unpacks to more than the limit of {limit} bytes; refused")
        if digest is not None:
            digest.update(block)
        out.write(block)
        advance(len(block))
    return total


def _check_download(archive: Archive, target: Path, received: int, announced: int | None,
                    actual: str) -> None:
    """A short read or a wrong hash: refused (atomic_path then removes the temporary file)."""
    if announced and received != announced:
        raise DownloadError(f"could not download {archive.url}: the transfer ended after {received} of "
                            f"{announced} bytes (truncated); run again, or {_by_hand(archive, target)}")
    if archive.size and received != archive.size:
        raise DownloadError(f"{archive.url}: {received} bytes received, the YAML expects {archive.size}; "
                            f"the file was not kept. If the YAML is right, {_by_hand(archive, target)}")
    if archive.sha256 and actual != archive.sha256:
        raise DownloadError(
            f"{archive.url}: sha256 mismatch: expected {archive.sha256}, actual {actual} ({received} bytes); "
            f"the file was not kept. If the YAML is right, {_by_hand(archive, target)}")


# ----------------------------------------------------------------------------------- extraction
@dataclass
class _Entry:
    """One archive member, format-neutral. kind: 'file', 'dir', 'symlink', 'hardlink' or 'other'."""

    name: str
    kind: str
    size: int
    link: str = ""
    open: Callable[[], IO[bytes]] | None = None


def _tar_entries(tf: tarfile.TarFile) -> list[_Entry]:
    entries = []
    for m in tf.getmembers():
        kind = ("file" if m.isfile() else "dir" if m.isdir() else "symlink" if m.issym()
                else "hardlink" if m.islnk() else "other")
        entries.append(_Entry(m.name, kind, m.size if m.isfile() else 0, m.linkname,
                              (lambda m=m: tf.extractfile(m)) if m.isfile() else None))
    return entries


def _zip_entries(zf: zipfile.ZipFile) -> list[_Entry]:
    entries = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if (mode & 0o170000) == 0o120000:  # a symlink stored the Unix way: the data are its target
            link = zf.read(info).decode("utf-8", "replace") if info.file_size <= 4096 else "/"  # "/": refused
            entries.append(_Entry(info.filename, "symlink", 0, link))
        elif info.is_dir():
            entries.append(_Entry(info.filename, "dir", 0))
        else:
            entries.append(_Entry(info.filename, "file", info.file_size, "", lambda info=info: zf.open(info)))
    return entries


def _inside(path: str | Path, root: str | Path) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root + os.sep)


def _target(entry: _Entry, dest: Path, archive: Path) -> Path:
    """Where an entry goes; UnsafeArchiveError for an absolute path or a '..' component."""
    name = entry.name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"{archive}: entry {entry.name!r} is an absolute path; archive refused")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: entry {entry.name!r} contains '..' (it would be written "
                                 "outside the dataset folder); archive refused")
    return dest.joinpath(*parts) if parts else dest


def _link_source(entry: _Entry, target: Path, dest: Path, archive: Path) -> Path:
    """Where a link entry points; UnsafeArchiveError when that is outside `dest`."""
    if entry.link.startswith("/") or not entry.link:
        where = dest / "x"  # an absolute (or empty) link target always leaves the folder
    elif entry.kind == "hardlink":
        where = Path(os.path.normpath(dest / entry.link))  # tar hard links name another member
    else:
        where = Path(os.path.normpath(target.parent / entry.link))
    if entry.link.startswith("/") or not entry.link or not _inside(where, dest):
        raise UnsafeArchiveError(f"{archive}: entry {entry.name!r} is a link to {entry.link!r}, outside the "
                                 "dataset folder; archive refused")
    return where


def _plan(entries: list[_Entry], dest: Path, archive: Path, limit: int) -> list[tuple[_Entry, Path]]:
    """Check every entry before anything is written: names, link targets, kinds and the total size."""
    plan = []
    for entry in entries:
        target = _target(entry, dest, archive)
        if entry.kind == "other":
            raise UnsafeArchiveError(f"{archive}: entry {entry.name!r} is a device file or FIFO; "
                                     "archive refused")
        if entry.kind in ("symlink", "hardlink"):
            _link_source(entry, target, dest, archive)
        plan.append((entry, target))
    total = sum(e.size for e in entries)
    if total > limit:
        raise UnsafeArchiveError(f"{archive}: unpacks to {total} bytes, more than the limit of {limit}; "
                                 "refused")
    return plan


def _writable(target: Path, dest_real: str, archive: Path, entry: _Entry) -> None:
    """Make target's folder; refuse when an earlier link would redirect the write out of the folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _inside(os.path.realpath(target.parent), dest_real):
        raise UnsafeArchiveError(f"{archive}: entry {entry.name!r} would be written through a link leading "
                                 "outside the dataset folder; archive refused")
    if target.is_symlink() or target.is_file():
        target.unlink()  # never write through an existing link


def _write(entry: _Entry, target: Path, dest: Path, archive: Path, budget: list[int]) -> None:
    dest_real = os.path.realpath(dest)
    if entry.kind == "dir":
        _writable(target / "x", dest_real, archive, entry)
        return
    _writable(target, dest_real, archive, entry)
    if entry.kind == "symlink":
        os.symlink(entry.link, target)
        if not _inside(os.path.realpath(target), dest_real):
            target.unlink()
            raise UnsafeArchiveError(f"{archive}: entry {entry.name!r} is a link that resolves outside the "
                                     "dataset folder; archive refused")
    elif entry.kind == "hardlink":
        source = _link_source(entry, target, dest, archive)
        if not _inside(os.path.realpath(source), dest_real) or not source.is_file():
            raise UnsafeArchiveError(f"{archive}: entry {entry.name!r} links to {entry.link!r}, not a file "
                                     "extracted before it; archive refused")
        shutil.copyfile(source, target)
    else:
        with entry.open() as src, open(target, "xb") as out:
            budget[0] -= _copy(src.read, out, lambda n: None, limit=budget[0], what=str(archive))


def extract(archive: str | Path, dest: str | Path, max_bytes: int = MAX_EXTRACT_BYTES) -> None:
    """Unpack a zip or tar (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) into `dest`, refusing unsafe entries.

    Raises UnsafeArchiveError (see the module docstring) or DownloadError for a damaged or truncated
    archive. `dest` may be left half-filled on error: callers extract into a temporary folder.
    """
    archive, dest = Path(archive), Path(dest)
    limit = min(max_bytes, max(archive.stat().st_size, 1) * MAX_EXTRACT_RATIO)
    try:
        with _open_archive(archive) as entries:
            budget = [limit]
            for entry, target in _plan(entries, dest, archive, limit):
                _write(entry, target, dest, archive, budget)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as err:
        reason = str(err) or type(err).__name__
        raise DownloadError(f"{archive}: damaged or truncated archive ({reason})") from None


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[list[_Entry]]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield _zip_entries(zf)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            yield _tar_entries(tf)
    else:
        raise DownloadError(f"{archive}: not a zip or tar archive (truncated, or an error page saved "
                            "instead of the file?)")


# ------------------------------------------------------------------------------ the whole step
def fetch_and_extract(archives: list[Archive], root: Path, max_bytes: int = MAX_EXTRACT_BYTES,
                      progress: bool = True) -> None:
    """Download what is missing into `root`, extract every archive into one temporary folder inside
    `root` (archives may add to the same tree, as VOC's do) and move its top-level entries into `root`.

    A damaged archive is deleted (the next run downloads it again); nothing is written outside `root`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = [ensure_archive(a, root, progress) for a in archives]
    staging = temp_name_beside(root / "extracted")
    staging.mkdir()
    try:
        for archive, file in zip(archives, files):
            LOGGER.info(f"Extracting {file}")
            try:
                extract(file, staging, max_bytes)
            except DownloadError as err:
                file.unlink(missing_ok=True)
                raise type(err)(f"{err}; {file.name} was deleted: run again to download it, or "
                                f"{_by_hand(archive, file)}") from None
        move_into(staging, root, keep={a.name for a in archives} | {MARKER, LOCK})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into(staging: Path, root: Path, keep: set[str] = frozenset()) -> None:
    """Move staging's top-level entries into root, replacing same-named ones (left by an unfinished
    run); entries named in `keep` (the archives, the marker) may not be replaced."""
    for item in sorted(Path(staging).iterdir()):
        if item.name in keep:
            raise UnsafeArchiveError(f"an archive entry is named {item.name!r}, like a file the download "
                                     "keeps in the dataset folder; refused")
        target = Path(root) / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.rename(item, target)


def check_expected_counts(expected, splits: dict, source: str, root: Path) -> None:
    """Images and label files per split against the YAML's `expected` ({split: {images, labels}})."""
    from data.verify import img2label_paths, list_image_files

    if not isinstance(expected, dict):
        raise ValueError(f"{source}: 'expected' must map splits to {{images: N, labels: N}}, "
                         f"got {expected!r}")
    problems = []
    for split, want in expected.items():
        if not isinstance(want, dict) or not set(want) <= {"images", "labels"}:
            raise ValueError(f"{source}: expected.{split} must be {{images: N, labels: N}}, got {want!r}")
        paths = splits.get(split)
        try:
            images = list_image_files(paths)[0] if paths else []
        except FileNotFoundError:
            images = []
        have = {"images": len(images), "labels": sum(map(os.path.isfile, img2label_paths(images)))}
        problems += [f"{split}: {have[k]} {k}, expected {n}" for k, n in want.items() if have[k] != int(n)]
    if problems:
        raise DownloadError(
            f"{source}: the prepared data do not match the YAML's expected counts ({'; '.join(problems)}): "
            f"the download is incomplete or the publisher changed it. Delete {root} to download again.")
    LOGGER.info(f"{source}: expected counts of images and labels found ({', '.join(expected)})")
