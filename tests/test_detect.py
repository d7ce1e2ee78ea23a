"""detect.py: images, videos, labels, crops, CSV, --classes, --vid-stride, bad sources, the CLI."""

from __future__ import annotations

import csv
import logging
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engine.predictor import describe, is_stream, run
from detect import main as detect_main
from models.yolo import DetectionModel
from engine.checkpoint import checkpoint_dict, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c"]
IMGSZ = 160
MAX_DET = 4


def confident_checkpoint(path: Path) -> Path:
    """yolov5n, 3 classes, with objectness biases raised so every cell scores ~0.5 without training."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=len(NAMES))
    model.names = list(NAMES)
    with torch.no_grad():
        for conv in model.model[-1].m:
            bias = conv.bias.view(model.model[-1].na, -1)
            bias[:, 4] = 8.0  # objectness ~1
            bias[:, 5:] = 0.0  # class scores ~0.5, decided by the random weights
    return save_checkpoint(checkpoint_dict(model), path / "w.pt")


def draw_image(seed: int, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = np.full((*size, 3), 180, np.uint8)
    for _ in range(3):
        x, y = int(rng.integers(0, size[1] - 60)), int(rng.integers(0, size[0] - 60))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(im, (x, y), (x + 50, y + 40), colour, -1)
    cv2.circle(im, (size[1] // 2, size[0] // 2), 30, (20, 20, 220), -1)
    return im


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return confident_checkpoint(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        cv2.imwrite(str(folder / f"im{i}.jpg"), draw_image(i))
    return folder


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    """12 frames, 320x240, 10 fps, 'mp4v'."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for i in range(12):
        writer.write(draw_image(100 + i))
    writer.release()
    return path


def read_label_lines(file: Path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in file.read_text().splitlines() if line.strip()]


def detect(weights: Path, source: Path, project: Path, **kwargs) -> Path:
    options = dict(imgsz=IMGSZ, device="cpu", max_det=MAX_DET, project=project, name="exp")
    options.update(kwargs)
    return run(weights, source, **options)


def test_folder_writes_images_labels_crops_and_csv(weights, image_folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vitdet"):
        save_dir = detect(weights, image_folder, tmp_path, save_txt=True, save_conf=True, save_crop=True,
                          save_csv=True)
    assert save_dir == tmp_path / "exp"
    saved = sorted(p.name for p in save_dir.glob("*.jpg"))
    assert saved == ["im0.jpg", "im1.jpg", "im2.jpg"]
    for name in saved:  # annotated images keep the source size
        assert cv2.imread(str(save_dir / name)).shape == (240, 320, 3)
    label_files = sorted((save_dir / "labels").glob("*.txt"))
    assert [f.name for f in label_files] == ["im0.txt", "im1.txt", "im2.txt"]
    classes = Counter()
    for file in label_files:
        rows = read_label_lines(file)
        assert len(rows) == MAX_DET
        for row in rows:
            assert len(row) == 6  # class x y w h conf
            assert row[0] in (0, 1, 2) and all(0 <= v <= 1 for v in row[1:5]) and 0.25 < row[5] <= 1
            classes[NAMES[int(row[0])]] += 1
    crops = Counter(p.parent.name for p in (save_dir / "crops").rglob("*.jpg"))
    assert crops == classes  # one crop per detection, in its class folder
    with open(save_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * MAX_DET and {r["image"] for r in rows} == {"im0.jpg", "im1.jpg", "im2.jpg"}
    assert all(0 <= float(r["x1"]) < float(r["x2"]) <= 320 for r in rows)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("image ")]
    assert len(progress) == 3 and progress[0].startswith("image 1/3 ") and progress[0].endswith("ms")
    for line in progress:  # "image 1/3 path: 128x160 3 a, 1 c, 12.3ms": counts add up to the detections
        assert ": 128x160 " in line
        assert sum(int(n) for n in re.findall(r"(\d+) [abc],", line)) == MAX_DET


def test_classes_keeps_only_the_requested_class(weights, image_folder, tmp_path):
    single = image_folder / "im0.jpg"
    filtered = detect(weights, single, tmp_path, save_txt=True, classes=[2], max_det=30, nosave=True)
    rows = read_label_lines(filtered / "labels" / "im0.txt")
    assert rows and {row[0] for row in rows} == {2.0}
    unfiltered = detect(weights, single, tmp_path, save_txt=True, max_det=30, nosave=True)
    all_rows = read_label_lines(unfiltered / "labels" / "im0.txt")
    assert len({row[0] for row in all_rows}) > 1  # without --classes other classes do appear


def test_classes_out_of_range_is_an_error(weights, image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"--classes 7: the model has 3 classes"):
        detect(weights, image_folder, tmp_path, classes=[7])


def test_video_keeps_frame_count_size_and_fps(weights, video_file, tmp_path):
    save_dir = detect(weights, video_file, tmp_path, save_txt=True)
    cap = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    try:
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (320, 240)
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    finally:
        cap.release()
    labels = sorted(p.name for p in (save_dir / "labels").glob("*.txt"))
    assert labels == sorted(f"clip_{i}.txt" for i in range(1, 13))


def test_vid_stride_keeps_every_nth_frame(weights, video_file, tmp_path):
    save_dir = detect(weights, video_file, tmp_path, save_txt=True, vid_stride=3)
    cap = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    try:
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    finally:
        cap.release()
    labels = sorted(p.name for p in (save_dir / "labels").glob("*.txt"))
    assert labels == [f"clip_{i}.txt" for i in range(1, 5)]


def test_missing_source_is_an_error_naming_it(weights, tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        detect(weights, missing, tmp_path)


def test_unreadable_image_is_reported_and_skipped(weights, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.jpg"), draw_image(7))
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    with caplog.at_level(logging.INFO, logger="vitdet"):
        save_dir = detect(weights, folder, tmp_path, save_txt=True)
    assert any("broken.jpg" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert [p.name for p in save_dir.glob("*.jpg")] == ["good.jpg"]
    assert [p.name for p in (save_dir / "labels").glob("*.txt")] == ["good.txt"]


def test_half_on_cpu_is_refused(weights, image_folder, tmp_path):
    with pytest.raises(ValueError, match="CUDA"):
        detect(weights, image_folder, tmp_path, half=True)


def test_incrementing_folders_hide_labels_and_nosave(weights, image_folder, tmp_path):
    single = image_folder / "im0.jpg"
    labelled = detect(weights, single, tmp_path)
    bare = detect(weights, single, tmp_path, hide_labels=True)
    unsaved = detect(weights, single, tmp_path, save_txt=True, nosave=True)
    assert (labelled.name, bare.name, unsaved.name) == ("exp", "exp2", "exp3")
    original = cv2.imread(str(single)).astype(int)
    drawn_labelled = np.abs(cv2.imread(str(labelled / "im0.jpg")).astype(int) - original).sum()
    drawn_bare = np.abs(cv2.imread(str(bare / "im0.jpg")).astype(int) - original).sum()
    assert 0 < drawn_bare < drawn_labelled  # boxes drawn either way; label tabs only when not hidden
    assert not list(unsaved.glob("*.jpg"))
    rows = read_label_lines(unsaved / "labels" / "im0.txt")
    assert len(rows) == MAX_DET and all(len(row) == 5 for row in rows)  # no conf without --save-conf


def test_describe_and_is_stream():
    det = torch.tensor([[0, 0, 1, 1, 0.9, 2], [0, 0, 1, 1, 0.8, 0], [0, 0, 1, 1, 0.7, 2]])
    assert describe(det, NAMES) == "1 a, 2 c, "
    assert describe(torch.zeros(0, 6), NAMES) == "(no detections), "
    assert is_stream("0") and is_stream("rtsp://host/live") and is_stream("cams.streams")
    assert not is_stream("folder/images") and not is_stream("list.txt")


def test_cli_runs_and_reports_errors(weights, image_folder, tmp_path, caplog):
    ok = subprocess.run(
        [sys.executable, "detect.py", "--weights", str(weights), "--source", str(image_folder / "im1.jpg"),
         "--imgsz", str(IMGSZ), "--device", "cpu", "--project", str(tmp_path), "--save-txt",
         "--max-det", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(read_label_lines(tmp_path / "exp" / "labels" / "im1.txt")) == 2
    assert "image 1/1" in ok.stderr and "Results saved to" in ok.stderr
    with caplog.at_level(logging.ERROR, logger="vitdet"):
        status = detect_main(["--weights", str(weights), "--source", str(tmp_path / "absent.jpg"),
                              "--device", "cpu", "--project", str(tmp_path)])
    assert status == 1 and any("absent.jpg" in r.getMessage() for r in caplog.records)
