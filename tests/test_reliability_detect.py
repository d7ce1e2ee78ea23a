"""Hostile and careless inputs to detect.py / val.py (project issue 15): class names that are paths,
corrupt videos, --device spellings, --half on the CPU in val.py, image URLs, FIFOs and files
without an extension."""

from __future__ import annotations

import errno
import functools
import http.server
import logging
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import val
from data.sources import LoadImages, expand_source
from detect import main as detect_main
from engine.checkpoint import checkpoint_dict, save_checkpoint
from engine.predictor import is_image_url, is_stream, run
from models.yolo import DetectionModel
from utils.paths import safe_path_component
from utils.torch_utils import parse_device, select_device

IMGSZ = 160


# ----------------------------------------------------------------------------------------- helpers
def one_class_per_anchor_checkpoint(path: Path, names: list[str]) -> Path:
    """yolov5n whose every anchor of every level fires everywhere (objectness ~1) for one class of its
    own, anchor k -> class k % nc, so every class is detected in every image without training."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=len(names))
    model.names = list(names)
    detect = model.model[-1]
    with torch.no_grad():
        for level, conv in enumerate(detect.m):
            bias = conv.bias.view(detect.na, -1)
            bias[:, 4] = 8.0
            bias[:, 5:] = -8.0
            for anchor in range(detect.na):
                bias[anchor, 5 + (level * detect.na + anchor) % len(names)] = 8.0
    return save_checkpoint(checkpoint_dict(model), path)


def draw_image(size: tuple[int, int] = (120, 160)) -> np.ndarray:
    im = np.full((*size, 3), 180, np.uint8)
    cv2.rectangle(im, (20, 20), (70, 60), (40, 120, 200), -1)
    cv2.circle(im, (110, 80), 25, (20, 20, 220), -1)
    return im


def write_video(path: Path, frames: int = 20, size: tuple[int, int] = (96, 64), fourcc: str = "mp4v") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, size)
    assert writer.isOpened()
    for k in range(frames):
        writer.write(np.full((size[1], size[0], 3), (k * 12) % 256, np.uint8))
    writer.release()
    return path


def garble_tail(path: Path, keep: float = 0.35) -> Path:
    """Overwrite the last part of the mp4's sample data (its 'mdat' box) with 0xff, keeping the index
    ('moov'): OpenCV opens the file, reports every frame, and stops reading part-way."""
    data = bytearray(path.read_bytes())
    start = data.index(b"mdat") + 4
    size = int.from_bytes(data[start - 8:start - 4], "big")
    end = start - 8 + size
    cut = int(start + (end - start) * keep)
    data[cut:end] = b"\xff" * (end - cut)
    path.write_bytes(bytes(data))
    return path


def detect(weights: Path, source, project: Path, **kwargs) -> Path:
    options = dict(imgsz=IMGSZ, device="cpu", project=project, name="exp")
    options.update(kwargs)
    return run(weights, source, **options)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return one_class_per_anchor_checkpoint(tmp_path_factory.mktemp("weights") / "w.pt", ["a", "b", "c"])


# ------------------------------------------------------------- 1. names from files become paths
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "a\\b", "nul\0byte", ".", "..", "",
                                  "C:drive", "new\nline", "x" * 300])
def test_safe_path_component_makes_one_harmless_component(name):
    safe = safe_path_component(name)
    assert safe and safe not in (".", "..")
    assert not set(safe) & {"/", "\\", "\0", ":", "\n"}
    assert len(safe.encode()) <= 200
    assert Path(safe).name == safe and not Path(safe).is_absolute()
    assert safe_path_component(name) == safe  # deterministic


def test_safe_path_component_keeps_ordinary_names_and_distinct_names_distinct():
    for ordinary in ("person", "traffic light", "café", "a.b", "...", "x-y_z (1)"):
        assert safe_path_component(ordinary) == ordinary
    hostile = ["../x", "__x", "_.x", ".._x", "/x", "\\x", "x/", "", ".", "..", "_", "__"]
    assert len({safe_path_component(n) for n in hostile}) == len(hostile)


def test_crop_class_names_cannot_leave_the_run_folder(tmp_path):
    outside = tmp_path / "absolute_target"
    names = ["../escape", str(outside), "..", ".", "", "a/b", "nul\0x", "__escape"]
    weights = one_class_per_anchor_checkpoint(tmp_path / "hostile.pt", names)
    image = tmp_path / "in" / "im0.jpg"
    image.parent.mkdir()
    cv2.imwrite(str(image), draw_image())
    project = tmp_path / "runs"
    save_dir = detect(weights, image, project, save_crop=True, save_txt=True, max_det=1000)
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - {weights, image}
    assert written and all(save_dir in p.parents for p in written), sorted(map(str, written))
    assert not outside.exists() and not (tmp_path / "escape").exists()
    folders = {p.name for p in (save_dir / "crops").iterdir()}
    assert folders == {safe_path_component(n) for n in names}  # one folder per class, none shared
    assert all(p.parent.parent == save_dir / "crops" for p in (save_dir / "crops").rglob("*.jpg"))


def test_stream_names_become_safe_file_names():
    """A stream's name comes from its URL: `Path(url).stem` may be '..' or carry odd characters."""
    from engine.predictor import output_stem

    assert output_stem(Path("rtsp://host/..")) == safe_path_component("..")
    assert output_stem(Path("/data/clip.mp4")) == "clip"


# -------------------------------------------------------------------------- 2. corrupt videos
def corrupt_video(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.mp4"
    if kind == "truncated":
        good = write_video(folder / "whole.mp4").read_bytes()
        path.write_bytes(good[: len(good) // 2])
        (folder / "whole.mp4").unlink()
    elif kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file, not a video\n" * 20)
    elif kind == "zero_frame":
        write_video(path, frames=0)
    return path


@pytest.mark.parametrize("kind", ["truncated", "zero_byte", "text", "zero_frame"])
def test_unreadable_video_is_an_error_naming_it(weights, tmp_path, caplog, kind):
    video = corrupt_video(kind, tmp_path)
    with caplog.at_level(logging.WARNING, logger="vitdet"), pytest.raises(ValueError, match=f"{kind}.mp4"):
        detect(weights, video, tmp_path / "runs")
    assert any(f"{kind}.mp4" in m and "0 frames" in m for m in warnings_of(caplog)), warnings_of(caplog)


def test_unreadable_video_makes_detect_exit_non_zero(weights, tmp_path, caplog):
    video = corrupt_video("zero_byte", tmp_path)
    with caplog.at_level(logging.ERROR, logger="vitdet"):
        status = detect_main(["--weights", str(weights), "--source", str(video), "--device", "cpu",
                              "--imgsz", str(IMGSZ), "--project", str(tmp_path / "runs")])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert status == 1 and any("zero_byte.mp4" in m for m in errors), errors


def test_garbled_video_warns_how_many_frames_were_read(weights, tmp_path, caplog):
    video = garble_tail(write_video(tmp_path / "garbled.mp4", frames=20))
    with caplog.at_level(logging.WARNING, logger="vitdet"):
        save_dir = detect(weights, video, tmp_path / "runs", save_txt=True, max_det=5)
    read = len(list((save_dir / "labels").glob("*.txt")))
    assert 0 < read < 20
    assert any("garbled.mp4" in m and f"{read} of 20 frames" in m for m in warnings_of(caplog)), \
        warnings_of(caplog)


def test_whole_video_gives_no_warning_and_a_bad_one_in_a_folder_does_not_stop_the_rest(weights, tmp_path,
                                                                                        caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_video(folder / "good.mp4", frames=6)
    corrupt_video("zero_byte", folder)
    cv2.imwrite(str(folder / "still.jpg"), draw_image())
    with caplog.at_level(logging.WARNING, logger="vitdet"):
        save_dir = detect(weights, folder, tmp_path / "runs", save_txt=True, max_det=5)
    assert len(list((save_dir / "labels").glob("good_*.txt"))) == 6
    assert (save_dir / "labels" / "still.txt").is_file()
    messages = warnings_of(caplog)
    assert any("zero_byte.mp4" in m for m in messages) and not any("good.mp4" in m for m in messages)


def test_vid_stride_on_a_frame_count_it_does_not_divide_gives_no_warning(tmp_path, caplog):
    video = write_video(tmp_path / "ten.mp4", frames=10)
    with caplog.at_level(logging.WARNING, logger="vitdet"):
        loader = LoadImages(video, img_size=64, vid_stride=3)
        frames = list(loader)
    assert len(frames) == loader.frames == 3 and not warnings_of(caplog)
    assert frames[-1][4].startswith("video 1/1 (3/3) ")


# ------------------------------------------------------------------------------ 3. --device
@pytest.mark.parametrize("spec, kind, indices", [
    ("", "auto", ()), ("none", "auto", ()), ("cpu", "cpu", ()), (" CPU ", "cpu", ()), ("mps", "mps", ()),
    ("cuda", "cuda", (0,)), ("cuda:1", "cuda", (1,)), ("CUDA:2", "cuda", (2,)), ("1", "cuda", (1,)),
    ("0,1", "cuda", (0, 1)), ("0, 1", "cuda", (0, 1)), ("cuda:0,cuda:1", "cuda", (0, 1)), (3, "cuda", (3,)),
    (torch.device("cuda:1"), "cuda", (1,)), (torch.device("cuda"), "cuda", (0,)),
    (torch.device("cpu"), "cpu", ()),
])
def test_parse_device_understands_what_torch_accepts(spec, kind, indices):
    request = parse_device(spec)
    assert (request.kind, request.indices) == (kind, indices)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "-1", "0,,1", "cpu,0", "1.5", "0,0", "cuda1"])
def test_parse_device_rejects_other_spellings_naming_them(spec):
    with pytest.raises(ValueError, match=f"--device '{spec}'"):
        parse_device(spec)


def test_cuda_request_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1", "0", "0,1"):
        with pytest.raises(ValueError, match=rf"--device '{spec}' asks for CUDA, but CUDA is not available"):
            select_device(spec)
    assert select_device("") == torch.device("cpu") and select_device("cpu") == torch.device("cpu")


def test_cuda_requests_are_accepted_where_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda") == torch.device("cuda:0")
    assert select_device("cuda:1") == torch.device("cuda:1") == select_device("1")
    assert select_device("0,1") == torch.device("cuda:0") and select_device("") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"--device 'cuda:2': only 2 CUDA device\(s\) present \(0, 1\)"):
        select_device("cuda:2")


# ------------------------------------------------------------------------ 4. val.py --half on CPU
def test_val_half_on_cpu_is_a_clean_refusal(tiny_checkpoint, tiny_data, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="vitdet"):
        status = val.main(["--weights", str(tiny_checkpoint), "--data", str(tiny_data), "--device", "cpu",
                           "--half", "--project", str(tmp_path), "--imgsz", "64"])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert status == 1 and any(m.startswith("val.py: --half needs a CUDA device") for m in errors), errors


def test_val_cuda_without_cuda_is_a_clean_refusal(tiny_checkpoint, tiny_data, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.ERROR, logger="vitdet"):
        status = val.main(["--weights", str(tiny_checkpoint), "--data", str(tiny_data), "--device", "cuda",
                           "--project", str(tmp_path), "--imgsz", "64"])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert status == 1 and any("--device 'cuda'" in m for m in errors), errors


# ------------------------------------------------------------------------------- 5. image URLs
@pytest.fixture()
def http_folder(tmp_path):
    """(folder, base URL) of a localhost HTTP server over a temporary folder, in a background thread."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


def test_image_url_is_fetched_and_detected_like_a_file(weights, http_folder, tmp_path):
    folder, base = http_folder
    cv2.imwrite(str(folder / "pic.jpg"), draw_image())
    save_dir = detect(weights, f"{base}/pic.jpg?size=large", tmp_path / "runs", save_txt=True, max_det=5)
    assert cv2.imread(str(save_dir / "pic.jpg")).shape == (120, 160, 3)
    assert len((save_dir / "labels" / "pic.txt").read_text().splitlines()) == 5


def test_image_url_errors_name_the_url(weights, http_folder, tmp_path):
    folder, base = http_folder
    with pytest.raises(ConnectionError, match=r"missing\.jpg.*404"):
        detect(weights, f"{base}/missing.jpg", tmp_path / "runs")
    (folder / "fake.jpg").write_text("not a jpeg")
    with pytest.raises(ValueError, match=r"fake\.jpg"):
        detect(weights, f"{base}/fake.jpg", tmp_path / "runs")


def test_url_without_an_image_suffix_stays_a_stream():
    assert is_image_url("http://host/x.jpg") and is_image_url("HTTPS://host/a/b.PNG?token=1")
    assert not is_stream("http://host/x.jpg") and not is_stream("https://host/x.webp")
    assert is_stream("http://host/live") and is_stream("https://host/video.mp4") and is_stream("rtsp://h/x.jpg")
    assert not is_image_url("rtsp://h/x.jpg") and not is_image_url("http://host/live")


# ------------------------------------------------------------------------------------- 6. FIFOs
def _open_writer_when_read(fifo: Path, stop: threading.Event) -> int | None:
    """A blocking write descriptor of `fifo` once some reader has it open; None when `stop` is set."""
    while not stop.is_set():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
        except OSError as err:
            if err.errno != errno.ENXIO:
                return None
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        return fd
    return None


def feed_fifo(fifo: Path, data: bytes, stop: threading.Event, repeat: bool = False) -> threading.Thread:
    """Write `data` into `fifo` when a reader opens it (with `repeat`, for every reader until `stop`
    is set: a loader that wrongly opens the FIFO then reads an empty pipe instead of hanging)."""

    def writer():
        while (fd := _open_writer_when_read(fifo, stop)) is not None:
            try:
                os.write(fd, data)
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)
            if not repeat:
                return

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


def test_fifo_is_read_as_a_video(weights, tmp_path):
    data = write_video(tmp_path / "clip.avi", frames=8).read_bytes()
    fifo = tmp_path / "camera_pipe"
    os.mkfifo(fifo)
    assert expand_source(fifo) == [str(fifo)]
    stop = threading.Event()
    feed_fifo(fifo, data, stop)
    try:
        save_dir = detect(weights, fifo, tmp_path / "runs", save_txt=True, max_det=5)
    finally:
        stop.set()
    assert len(list((save_dir / "labels").glob("camera_pipe_*.txt"))) == 8
    cap = cv2.VideoCapture(str(save_dir / "camera_pipe.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 8
    cap.release()


def test_fifo_in_a_folder_is_skipped_with_a_word_not_opened(tmp_path, caplog):
    cv2.imwrite(str(tmp_path / "a.jpg"), draw_image())
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    stop = threading.Event()
    feed_fifo(fifo, b"", stop, repeat=True)  # so a loader that (wrongly) opens it cannot hang
    try:
        with caplog.at_level(logging.WARNING, logger="vitdet"):
            items = list(LoadImages(tmp_path, img_size=64))
    finally:
        stop.set()
    assert [Path(p).name for p, *_ in items] == ["a.jpg"]
    assert any("pipe.mp4" in m and "FIFO" in m for m in warnings_of(caplog)), warnings_of(caplog)
    fifos: list[str] = []
    assert expand_source(str(tmp_path / "*"), fifos) == [str(tmp_path / "a.jpg")]  # a glob does not open it
    assert fifos == [str(fifo)]


# -------------------------------------------------------------------- 7. files without a suffix
def test_files_without_an_extension_are_reported(tmp_path, caplog):
    cv2.imwrite(str(tmp_path / "a.jpg"), draw_image())
    for name in ("README", "Makefile", "photo", "LICENSE"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger="vitdet"):
        loader = LoadImages(tmp_path, img_size=64)
    assert loader.nf == 1
    summary = [m for m in warnings_of(caplog) if "4 files" in m]
    assert len(summary) == 1, warnings_of(caplog)
    assert "4 without an extension" in summary[0] and "LICENSE" in summary[0] and "Makefile" in summary[0]
    assert "images bmp" in summary[0] and "videos asf" in summary[0]
