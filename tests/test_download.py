"""Datasets by name (data/download.py through check_dataset): archives served by a loopback HTTP server.

Every bad archive is refused with a message naming the problem, nothing is written outside the
dataset folder, and no half-prepared folder is later taken as ready.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from data import download
from data.config import check_dataset
from data.download import DownloadError, UnsafeArchiveError, extract, parse_archives


# ------------------------------------------------------------------------------------ the server
class _Server:
    """Serves `files` (url path -> bytes); `cut` paths announce their full length but send half."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.log: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.log.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in server.cut else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture()
def datasets(tmp_path, monkeypatch):
    """$VITDET_DATASETS inside tmp_path/sandbox; tmp_path/outside must stay empty."""
    root = tmp_path / "sandbox" / "datasets"
    monkeypatch.setenv("VITDET_DATASETS", str(root))
    (tmp_path / "outside").mkdir()
    return root


def _files_outside(tmp_path: Path) -> list[str]:
    """Everything under tmp_path except the datasets folder and the YAMLs the test wrote."""
    found = []
    for path in tmp_path.rglob("*"):
        rel = path.relative_to(tmp_path)
        if rel.parts[:2] != ("sandbox", "datasets") and path.suffix != ".yaml" and path.is_file():
            found.append(str(rel))
    return found


def _left(root: Path) -> list[str]:
    """What a refused preparation left in the dataset folder, besides its lock file."""
    return sorted(p.name for p in root.iterdir() if p.name != download.LOCK)


# ------------------------------------------------------------------------------------ archives
def _jpeg(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _yolo_members() -> dict[str, bytes]:
    """A YOLO dataset under shapes/: 2 train images (one background), 1 val image."""
    return {
        "shapes/images/train/a.jpg": _jpeg(0),
        "shapes/images/train/b.jpg": _jpeg(1),
        "shapes/labels/train/a.txt": b"0 0.5 0.5 0.25 0.25\n",
        "shapes/images/val/c.jpg": _jpeg(2),
        "shapes/labels/val/c.txt": b"0 0.4 0.4 0.2 0.2\n",
    }


def _voc_members() -> dict[str, bytes]:
    """A Pascal-VOC folder under devkit/VOC: one train and one val image with one 'cell' each."""
    members = {}
    for k, split in enumerate(["train", "val"]):
        members[f"devkit/VOC/JPEGImages/{k}.jpg"] = _jpeg(k)
        members[f"devkit/VOC/Annotations/{k}.xml"] = (
            f"<annotation><filename>{k}.jpg</filename><size><width>48</width><height>32</height></size>"
            "<object><name>cell</name><difficult>0</difficult><bndbox><xmin>5</xmin><ymin>5</ymin>"
            "<xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>").encode()
        members[f"devkit/VOC/ImageSets/Main/{split}.txt"] = f"{k}\n".encode()
    return members


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """A .tar.gz of files plus links {name: (tarfile.SYMTYPE or LNKTYPE, target)}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _yolo_yaml(tmp_path: Path, url: str, sha: str | None = None, expected=None) -> Path:
    entry = {"url": url} | ({"sha256": sha} if sha else {})
    content = {"download": [entry], "train": "shapes/images/train", "val": "shapes/images/val",
               "names": ["thing"]}
    if expected:
        content["expected"] = expected
    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


# ------------------------------------------------------------------------------------ good archives
def test_verified_zip_downloads_once_and_is_reused(server, datasets, tmp_path):
    archive = _zip(_yolo_members())
    server.files["/shapes.zip"] = archive
    data_yaml = _yolo_yaml(tmp_path, f"{server.url}/shapes.zip", _sha(archive),
                           expected={"train": {"images": 2, "labels": 1}, "val": {"images": 1, "labels": 1}})
    cfg = check_dataset(data_yaml)
    root = datasets / "shapes"
    assert cfg["path"] == str(root) and cfg["train"] == str(root / "shapes" / "images" / "train")
    assert sorted(os.listdir(cfg["train"])) == ["a.jpg", "b.jpg"]
    assert (root / "shapes.zip").read_bytes() == archive and (root / download.MARKER).is_file()
    assert server.log == ["/shapes.zip"]
    assert check_dataset(data_yaml)["train"] == cfg["train"]
    assert server.log == ["/shapes.zip"]  # the second run found the data: no request
    hidden = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert hidden == [download.MARKER, download.LOCK]  # no temporary file left
    assert _files_outside(tmp_path) == []


def test_unverified_voc_tar_is_converted_and_counted(server, datasets, tmp_path, caplog):
    server.files["/voc.tar.gz"] = _tar(_voc_members())
    data_yaml = tmp_path / "cells.yaml"
    data_yaml.write_text(yaml.safe_dump({
        "download": [{"url": f"{server.url}/voc.tar.gz"}],
        "convert": {"format": "voc", "source": "devkit/VOC", "local": "no/such/copy"},
        "expected": {"train": {"images": 1, "labels": 1}, "val": {"images": 1, "labels": 1}},
        "train": "images/train", "val": "images/val", "names": ["cell"]}))
    with caplog.at_level(logging.INFO):
        cfg = check_dataset(data_yaml)
    assert "unverified" in caplog.text and "expected counts of images and labels found" in caplog.text
    root = datasets / "cells"
    assert cfg["path"] == str(root) and os.listdir(cfg["train"]) == ["0.jpg"]
    label = (root / "labels" / "train" / "0.txt").read_text().split()
    assert label[0] == "0" and float(label[1]) == pytest.approx((4 + 20) / 2 / 48, abs=1e-5)  # VOC 1-based
    check_dataset(data_yaml)
    assert server.log == ["/voc.tar.gz"]
    assert _files_outside(tmp_path) == []


def test_local_copy_of_the_convert_source_needs_no_network(datasets, tmp_path):
    copy = tmp_path / "copy"
    for name, data in _voc_members().items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    data_yaml = tmp_path / "cells.yaml"
    data_yaml.write_text(yaml.safe_dump({
        "download": [{"url": "http://127.0.0.1:9/never.zip"}],
        "convert": {"format": "voc", "source": "devkit/VOC", "local": ["no/such", str(copy / "devkit/VOC")]},
        "train": "images/train", "val": "images/val", "names": ["cell"]}))
    cfg = check_dataset(data_yaml)
    assert Path(cfg["path"]).name.startswith("cells-") and os.listdir(cfg["val"]) == ["1.jpg"]


# ------------------------------------------------------------------------------------ refusals
def test_wrong_hash_is_refused_and_nothing_is_kept(server, datasets, tmp_path):
    archive = _zip(_yolo_members())
    server.files["/shapes.zip"] = archive
    url = f"{server.url}/shapes.zip"
    with pytest.raises(DownloadError) as err:
        check_dataset(_yolo_yaml(tmp_path, url, "0" * 64))
    message = str(err.value)
    assert url in message and "0" * 64 in message and _sha(archive) in message
    assert str(datasets / "shapes" / "shapes.zip") in message  # where to put it by hand
    assert _left(datasets / "shapes") == []  # no archive, no temp file, no marker
    assert _files_outside(tmp_path) == []


def test_offline_message_names_url_and_place_and_a_file_put_there_is_used(datasets, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    archive = _zip(_yolo_members())
    url = f"http://127.0.0.1:{port}/shapes.zip"
    data_yaml = _yolo_yaml(tmp_path, url, _sha(archive))
    with pytest.raises(DownloadError, match="could not download") as err:
        check_dataset(data_yaml)
    target = datasets / "shapes" / "shapes.zip"
    assert url in str(err.value) and str(target) in str(err.value) and _sha(archive) in str(err.value)
    target.write_bytes(archive)  # by hand
    assert os.listdir(check_dataset(data_yaml)["val"]) == ["c.jpg"]
    target.write_bytes(archive + b"x")  # a wrong file by hand, after a new YAML: named with both hashes
    (datasets / "shapes" / download.MARKER).unlink()
    with pytest.raises(DownloadError, match="wrong sha256") as err:
        check_dataset(data_yaml)
    assert _sha(archive) in str(err.value) and _sha(archive + b"x") in str(err.value)


@pytest.mark.parametrize("case, archive, problem", [
    ("dotdot zip", lambda: _zip({"shapes/../../../outside/evil.txt": b"x", **_yolo_members()}),
     "contains '..'"),
    ("dotdot tar", lambda: _tar({**_yolo_members(), "../../outside/evil.txt": b"x"}), "contains '..'"),
    ("absolute tar", lambda: _tar({"/tmp/vitdet-evil.txt": b"x", **_yolo_members()}), "absolute path"),
    ("symlink out", lambda: _tar(_yolo_members(), {"shapes/out": (tarfile.SYMTYPE, "../../../outside")}),
     "outside the dataset folder"),
    ("absolute symlink", lambda: _tar(_yolo_members(), {"shapes/out": (tarfile.SYMTYPE, "/etc")}),
     "outside the dataset folder"),
    ("hardlink out", lambda: _tar(_yolo_members(), {"shapes/h": (tarfile.LNKTYPE, "../../outside/x")}),
     "outside the dataset folder"),
    ("symlink chain", lambda: _tar(_yolo_members(), {"l2": (tarfile.SYMTYPE, "."),
                                                     "l1": (tarfile.SYMTYPE, "l2/..")}), "resolves outside"),
    ("truncated zip", lambda: _zip(_yolo_members())[:-300], "not a zip or tar archive"),
    ("truncated tar", lambda: _tar(_yolo_members())[:700], "damaged or truncated"),
])
def test_bad_archives_are_refused(server, datasets, tmp_path, case, archive, problem):
    server.files["/shapes.zip"] = archive()
    data_yaml = _yolo_yaml(tmp_path, f"{server.url}/shapes.zip")  # no sha256: what the archive holds decides
    with pytest.raises(DownloadError, match=problem):
        check_dataset(data_yaml)
    root = datasets / "shapes"
    assert _files_outside(tmp_path) == [] and not Path("/tmp/vitdet-evil.txt").exists()
    assert not (root / download.MARKER).exists() and not (root / "shapes.zip").exists()
    assert _left(root) == []  # staging folder removed, bad archive deleted
    server.files["/shapes.zip"] = _zip(_yolo_members())  # fixed upstream: the next run starts over
    assert sorted(os.listdir(check_dataset(data_yaml)["train"])) == ["a.jpg", "b.jpg"]
    assert server.log == ["/shapes.zip", "/shapes.zip"]


def test_transfer_cut_short_is_refused(server, datasets, tmp_path):
    server.files["/shapes.zip"] = _zip(_yolo_members())
    server.cut.add("/shapes.zip")
    with pytest.raises(DownloadError, match="truncated|broke|IncompleteRead|could not download") as err:
        check_dataset(_yolo_yaml(tmp_path, f"{server.url}/shapes.zip"))
    assert f"{server.url}/shapes.zip" in str(err.value)
    assert _left(datasets / "shapes") == []


def test_size_cap_and_expected_counts(server, datasets, tmp_path):
    big = tmp_path / "big.zip"
    big.write_bytes(_zip({"zeros.bin": bytes(1 << 20)}))  # compresses about 1000:1
    with pytest.raises(UnsafeArchiveError, match="more than the limit"):
        extract(big, tmp_path / "sandbox" / "x")
    with pytest.raises(UnsafeArchiveError, match="more than the limit"):
        extract(tmp_path / "big.zip", tmp_path / "sandbox" / "y", max_bytes=1000)
    server.files["/shapes.zip"] = _zip(_yolo_members())
    data_yaml = _yolo_yaml(tmp_path, f"{server.url}/shapes.zip", expected={"train": {"images": 3}})
    with pytest.raises(DownloadError, match="train: 2 images, expected 3"):
        check_dataset(data_yaml)
    assert not (datasets / "shapes" / download.MARKER).exists()
    with pytest.raises(DownloadError, match="train: 2 images, expected 3"):  # never taken as ready
        check_dataset(data_yaml)
    assert server.log == ["/shapes.zip"]  # the kept archive is reused, not fetched again


def test_a_run_killed_before_the_marker_is_prepared_again(server, datasets, tmp_path, monkeypatch):
    server.files["/shapes.zip"] = _zip(_yolo_members())
    data_yaml = _yolo_yaml(tmp_path, f"{server.url}/shapes.zip")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "mark_complete", killed)
    with pytest.raises(KeyboardInterrupt):
        check_dataset(data_yaml)
    label = datasets / "shapes" / "shapes" / "labels" / "train" / "a.txt"
    label.write_text("damaged by the kill\n")
    monkeypatch.undo()
    monkeypatch.setenv("VITDET_DATASETS", str(datasets))
    check_dataset(data_yaml)
    assert label.read_text() == "0 0.5 0.5 0.25 0.25\n"  # extracted again, not taken as it was
    assert server.log == ["/shapes.zip"]


def test_download_entries_are_checked():
    with pytest.raises(ValueError, match="non-empty list"):
        parse_archives([], "x.yaml")
    with pytest.raises(ValueError, match="https://"):
        parse_archives([{"url": "ftp://host/a.zip"}], "x.yaml")
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_archives([{"url": "https://host/a.zip", "sha256": "abc"}], "x.yaml")
    with pytest.raises(ValueError, match="unknown keys \\['md5'\\]"):
        parse_archives([{"url": "https://host/a.zip", "md5": "abc"}], "x.yaml")
    (a,) = parse_archives([{"url": "https://host/p/a%20b.zip?x=1", "size": 5}], "x.yaml")
    assert a.name == "a b.zip" and a.size == 5 and a.sha256 is None


@pytest.mark.parametrize("name", ["bccd.yaml", "coco128.yaml", "voc.yaml"])
def test_shipped_download_yamls_are_well_formed(name):
    from data.config import DATA_CONFIGS, names_list

    cfg = yaml.safe_load((DATA_CONFIGS / name).read_text())
    archives = parse_archives(cfg["download"], name)
    assert all(a.url.startswith(("https://", "http://")) for a in archives)
    classes = {"bccd.yaml": 3, "coco128.yaml": 80, "voc.yaml": 20}[name]
    assert len(names_list(cfg["names"], None, name)) == classes
    counts = {k: v["images"] for k, v in cfg["expected"].items()}
    assert counts == {"bccd.yaml": {"train": 205, "val": 87, "test": 72}, "coco128.yaml": {"train": 128},
                      "voc.yaml": {"train": 16551, "val": 4952, "test": 4952}}[name]
