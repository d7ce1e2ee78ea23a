"""Bad input: every case skipped or repaired with its warning, right counts, batches still produced."""

from __future__ import annotations

import io
import logging
import os

import cv2
import numpy as np
import pytest
from PIL import Image

import data.verify as verify
from data.dataset import LoadImagesAndLabels
from data.loaders import create_dataloader
from data.verify import NoUsableImagesError, scan_dataset
from tests.data_fixtures import draw_boxes, no_augment_hyp, write_sample

NAMES = ["a", "b", "c"]
GOOD = draw_boxes(64, 64, [(8, 8, 40, 40)], [0])
BAD_ROWS = """0 0.5 0.5 0.2 0.2
0 0.5 0.5 0.2
7 0.3 0.3 0.1 0.1
1 -0.2 0.5 0.1 0.1
1 0.95 0.5 0.2 0.2
2 0.5 0.5 0 0.1
0 0.5 0.5 0.2 0.2
2 0.1 0.1 0.3 0.1 0.3 0.4
a b c d e
1.5 0.5 0.5 0.1 0.1
0 nan 0.5 0.1 0.1
0 0.5 0.5 1.5 0.2
"""


def _encoded(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _gif_bytes() -> bytes:
    out = io.BytesIO()
    Image.fromarray(GOOD).save(out, format="GIF")
    return out.getvalue()


def _bad_dataset(root):
    """Every kind of bad input next to a few good images; returns the images folder."""
    jpeg, png = _encoded(GOOD, ".jpg"), _encoded(GOOD, ".png")
    write_sample(root, "train", "good.png", GOOD, "0 0.375 0.375 0.5 0.5\n1 0.2 0.2 0.1 0.1\n")
    write_sample(root, "train", "rows.png", GOOD, BAD_ROWS)
    write_sample(root, "train", "bg.png", GOOD, None)
    write_sample(root, "train", "empty.png", GOOD, "\n  \n")
    write_sample(root, "train", "zero.jpg", b"", "0 0.5 0.5 0.1 0.1\n")
    write_sample(root, "train", "trunc.jpg", jpeg[: len(jpeg) // 2], "0 0.5 0.5 0.1 0.1\n")
    write_sample(root, "train", "noend.jpg", jpeg[:-2], None)  # only the end-of-image marker missing
    write_sample(root, "train", "garbage.png", os.urandom(300), None)
    write_sample(root, "train", "truncpng.png", png[: len(png) // 2], None)
    write_sample(root, "train", "anim.gif", _gif_bytes(), None)
    write_sample(root, "train", "fakegif.jpg", _gif_bytes(), None)
    write_sample(root, "train", "tiny.png", GOOD[:8, :8], None)
    write_sample(root, "train", "allbad.png", GOOD, "9 0.5 0.5 0.1 0.1\n")
    write_sample(root, "train", "binlabel.png", GOOD, None)
    (root / "labels" / "train" / "binlabel.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
    return root / "images" / "train"


@pytest.fixture()
def bad_dir(tmp_path):
    return _bad_dataset(tmp_path)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _one_line(lines: list[str], *parts: str) -> str:
    hits = [line for line in lines if all(p in line for p in parts)]
    assert len(hits) == 1, f"expected one warning with {parts}, got {hits}"
    return hits[0]


def test_every_bad_input_warns_with_file_and_reason(bad_dir, caplog):
    caplog.set_level(logging.INFO, logger="vitdet")
    scan = scan_dataset(bad_dir, nc=len(NAMES), prefix="train: ")
    lines = _warnings(caplog)
    assert all(line.startswith("train: ") for line in lines)
    _one_line(lines, "zero.jpg", "zero-byte file")
    _one_line(lines, "trunc.jpg", "truncated image file")
    _one_line(lines, "noend.jpg", "truncated JPEG (no end-of-image marker)")
    _one_line(lines, "garbage.png", "cannot read image (cannot identify image file")
    _one_line(lines, "truncpng.png", "truncated image file")
    _one_line(lines, "anim.gif", "unsupported format '.gif'")
    _one_line(lines, "fakegif.jpg", "unsupported image format GIF")
    _one_line(lines, "tiny.png", "8x8 is under 10 pixels")
    _one_line(lines, "allbad.txt", "class id not an integer in 0..2", "line 1")
    _one_line(lines, "allbad.txt", "image skipped: no usable label row")
    _one_line(lines, "binlabel.txt", "cannot be read as text")
    rows = "rows.txt"
    _one_line(lines, rows, "skipped 1 row (wrong number of values", "line 2")
    _one_line(lines, rows, "skipped 2 rows (class id not an integer in 0..2", "line 3, 10")
    _one_line(lines, rows, "skipped 2 rows (coordinates not normalised", "line 4, 12")
    _one_line(lines, rows, "clipped 1 row (corners outside [0, 1])", "line 5")
    _one_line(lines, rows, "skipped 1 row (zero or negative width/height)", "line 6")
    _one_line(lines, rows, "removed 1 row (duplicate)", "line 7")
    _one_line(lines, rows, "converted 1 row (polygon to box)", "line 8")
    _one_line(lines, rows, "skipped 1 row (non-numeric value)", "line 9")
    _one_line(lines, rows, "skipped 1 row (non-finite value)", "line 11")
    assert len(lines) == 20
    assert scan.counts == {"found": 2, "missing": 1, "empty": 1, "corrupt": 10}
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO][-1]
    assert summary.endswith("2 found, 1 missing (backgrounds), 1 empty, 10 corrupt")


def test_repaired_rows_have_the_right_values(bad_dir):
    scan = scan_dataset(bad_dir, nc=len(NAMES))
    items = zip(scan.im_files, scan.labels, scan.segments)
    by_name = {os.path.basename(f): (lb, seg) for f, lb, seg in items}
    assert sorted(by_name) == ["bg.png", "empty.png", "good.png", "rows.png"]
    labels, segments = by_name["rows.png"]
    expected = [[0, 0.5, 0.5, 0.2, 0.2], [1, 0.925, 0.5, 0.15, 0.2], [2, 0.2, 0.25, 0.2, 0.3]]
    np.testing.assert_allclose(labels, expected, atol=1e-6)
    assert len(segments) == 3  # a polygon row makes every row carry a polygon (boxes as rectangles)
    np.testing.assert_allclose(segments[2], [[0.1, 0.1], [0.3, 0.1], [0.3, 0.4]], atol=1e-6)
    np.testing.assert_allclose(segments[0], [[0.4, 0.4], [0.6, 0.4], [0.6, 0.6], [0.4, 0.6]], atol=1e-6)
    assert by_name["bg.png"][0].shape == (0, 5) and by_name["empty.png"][0].shape == (0, 5)


def test_training_batches_still_come_from_a_dataset_with_bad_files(bad_dir):
    hyp = no_augment_hyp(mosaic=1.0, scale=0.2, translate=0.1, fliplr=0.5, hsv_v=0.3, copy_paste=0.5)
    loader, dataset = create_dataloader(bad_dir, 64, 4, 32, hyp=hyp, augment=True, workers=0, names=NAMES)
    assert len(dataset) == 4
    images, targets, paths, shapes = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and images.dtype.is_floating_point is False
    assert targets.shape[1] == 6 and set(targets[:, 0].tolist()) <= {0, 1, 2, 3}
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
    assert shapes == (None, None, None, None)  # mosaic samples


def test_only_bad_files_is_an_error_that_says_what_was_found(tmp_path):
    write_sample(tmp_path, "train", "zero.jpg", b"", None)
    write_sample(tmp_path, "train", "garbage.png", os.urandom(100), None)
    write_sample(tmp_path, "train", "tiny.png", GOOD[:5, :5], None)
    with pytest.raises(NoUsableImagesError) as err:
        LoadImagesAndLabels(tmp_path / "images" / "train", 64, names=NAMES)
    message = str(err.value)
    assert "No usable images in" in message and "3 files found, all skipped" in message
    assert "zero-byte file" in message and "cannot read image" in message and "under 10 pixels" in message


def test_no_images_at_all_and_missing_source_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("hello")  # not an image: warned, not used
    with pytest.raises(NoUsableImagesError, match="No usable images .* unsupported format '.txt'"):
        scan_dataset(tmp_path / "images")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoUsableImagesError, match="No images found in"):
        scan_dataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        scan_dataset(tmp_path / "nowhere")


def test_list_file_with_relative_and_missing_entries(tmp_path, caplog):
    write_sample(tmp_path, "train", "good.png", GOOD, "0 0.5 0.5 0.5 0.5\n")
    listing = tmp_path / "train.txt"
    listing.write_text("# images\n./images/train/good.png\nimages/train/gone.png\n")
    scan = scan_dataset(listing)
    assert scan.im_files == [str(tmp_path / "images" / "train" / "good.png")]
    assert scan.counts == {"found": 1, "missing": 0, "empty": 0, "corrupt": 1}
    _one_line(_warnings(caplog), "gone.png", "listed in", "does not exist")


def test_cache_is_reused_and_rebuilt_when_a_label_changes(tmp_path):
    images = tmp_path / "images" / "train"
    write_sample(tmp_path, "train", "a.png", GOOD, "0 0.5 0.5 0.5 0.5\n")
    write_sample(tmp_path, "train", "b.png", GOOD, None)
    first = scan_dataset(images, nc=3)
    assert not first.from_cache and first.cache_file == tmp_path / "labels" / "train.vitdet.cache"
    with np.load(first.cache_file, allow_pickle=False) as cached:  # plain arrays, no pickle
        assert int(cached["version"][0]) == verify.CACHE_VERSION
    assert scan_dataset(images, nc=3).from_cache
    label = tmp_path / "labels" / "train" / "a.txt"
    mtime = label.stat().st_mtime_ns
    label.write_text("1 0.5 0.5 0.5 0.5\n")  # same size: only the modification time tells
    os.utime(label, ns=(mtime + 10**9, mtime + 10**9))  # filesystems with coarse timestamps
    edited = scan_dataset(images, nc=3)
    assert not edited.from_cache and edited.labels[0][0, 0] == 1
    write_sample(tmp_path, "train", "b.png", GOOD, "2 0.5 0.5 0.2 0.2\n")  # a background gets a label
    added = scan_dataset(images, nc=3)
    assert not added.from_cache and added.counts["found"] == 2
    assert not scan_dataset(images, nc=2).from_cache  # class 2 is now out of range
    assert scan_dataset(images, nc=2).counts == {"found": 1, "missing": 0, "empty": 0, "corrupt": 1}


def test_a_yolov5_cache_of_the_same_split_is_left_alone(tmp_path):
    images = tmp_path / "images" / "train"
    write_sample(tmp_path, "train", "a.png", GOOD, "0 0.5 0.5 0.5 0.5\n")
    yolov5_cache = tmp_path / "labels" / "train.cache"  # YOLOv5's name: np.save of a pickled dict
    yolov5_cache.write_bytes(b"\x93NUMPY yolov5's own cache")
    assert not scan_dataset(images).from_cache and scan_dataset(images).from_cache
    assert yolov5_cache.read_bytes() == b"\x93NUMPY yolov5's own cache"


def test_cache_rebuilt_on_format_version_change_or_damage(tmp_path, monkeypatch):
    images = tmp_path / "images" / "train"
    write_sample(tmp_path, "train", "a.png", GOOD, "0 0.5 0.5 0.5 0.5\n")
    cache = scan_dataset(images).cache_file
    monkeypatch.setattr(verify, "CACHE_VERSION", verify.CACHE_VERSION + 1)
    assert not scan_dataset(images).from_cache
    assert scan_dataset(images).from_cache
    cache.write_bytes(b"not a cache")
    rebuilt = scan_dataset(images)
    assert not rebuilt.from_cache and rebuilt.counts["found"] == 1


def test_cached_warnings_are_repeated_with_the_current_prefix(bad_dir, caplog):
    scan_dataset(bad_dir, nc=3, prefix="train: ")
    caplog.clear()
    assert scan_dataset(bad_dir, nc=3, prefix="val: ").from_cache
    lines = _warnings(caplog)
    assert len(lines) == 20 and all(line.startswith("val: ") for line in lines)


def test_large_scan_uses_the_pool_and_matches_serial(tmp_path, monkeypatch):
    for k in range(70):
        label = f"{k % 3} 0.5 0.5 0.5 0.5\n" if k % 5 else None  # every fifth image a background
        write_sample(tmp_path, "train", f"{k:03d}.png", GOOD[:16, :16], label)
    pooled = scan_dataset(tmp_path / "images" / "train", nc=3, workers=2)
    monkeypatch.setattr(verify, "SERIAL_SCAN_BELOW", 1000)
    pooled.cache_file.unlink()
    serial = scan_dataset(tmp_path / "images" / "train", nc=3)
    assert pooled.counts == serial.counts == {"found": 56, "missing": 14, "empty": 0, "corrupt": 0}
    assert all((a == b).all() for a, b in zip(pooled.labels, serial.labels))
