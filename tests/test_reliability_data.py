"""Issue 15, items 6 and 8: corrupt JPEG data the decoder only whispers about, and datasets whose
labels are mostly dropped (e.g. `names` shorter than the class ids) while the summary says "0 corrupt"."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

import data.verify as verify
from data.dataset import LoadImagesAndLabels
from data.verify import MostLabelsDroppedError, scan_dataset
from tests.data_fixtures import write_sample

BOX = "0 0.5 0.5 0.2 0.2\n"


def _photo(width: int = 160, height: int = 120, seed: int = 0) -> np.ndarray:
    """Smooth random colours plus noise: enough entropy-coded data that a cut lands inside it."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    return np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)


def _jpeg(progressive: bool = False, seed: int = 0) -> bytes:
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else []
    ok, buf = cv2.imencode(".jpg", _photo(seed=seed), params)
    assert ok
    return buf.tobytes()


def _cut_with_end_marker(jpeg: bytes) -> bytes:
    """First half of the file plus FF D9: the structure looks complete, half the pixels are missing."""
    return jpeg[: len(jpeg) // 2] + b"\xff\xd9"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _infos(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


# ------------------------------------------------------------------------------ item 6
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_cut_in_half_with_end_marker_is_skipped_naming_the_file(tmp_path, caplog, capfd, progressive):
    write_sample(tmp_path, "train", "good.jpg", _jpeg(progressive), BOX)
    write_sample(tmp_path, "train", "cut.jpg", _cut_with_end_marker(_jpeg(progressive, seed=1)), BOX)
    caplog.set_level(logging.INFO, logger="vitdet")
    scan = scan_dataset(tmp_path / "images" / "train", nc=1)
    assert [f.rsplit("/", 1)[-1] for f in scan.im_files] == ["good.jpg"]
    assert scan.counts == {"found": 1, "missing": 0, "empty": 0, "corrupt": 1}
    (line,) = _warnings(caplog)
    assert "cut.jpg: image skipped: corrupt JPEG data" in line and "premature end of data segment" in line
    assert "Corrupt JPEG data" not in capfd.readouterr().err  # the nameless libjpeg line is not leaked


def test_valid_progressive_and_trailing_data_jpegs_are_kept(tmp_path, caplog):
    write_sample(tmp_path, "train", "valid.jpg", _jpeg(), BOX)
    write_sample(tmp_path, "train", "progressive.jpg", _jpeg(progressive=True), BOX)
    write_sample(tmp_path, "train", "trailing.jpg", _jpeg() + b"\x00camera trailer" * 8, BOX)
    scan = scan_dataset(tmp_path / "images" / "train", nc=1)
    assert scan.counts == {"found": 3, "missing": 0, "empty": 0, "corrupt": 0}
    (line,) = _warnings(caplog)  # the trailing bytes are a repair (ignored by the decoder), said once
    assert "trailing.jpg: image kept: " in line and "after the JPEG end-of-image marker" in line
    assert cv2.imread(scan.im_files[-1]).shape == (120, 160, 3)


def test_corrupt_jpeg_is_found_by_the_pool_workers_too(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(verify, "SERIAL_SCAN_BELOW", 4)
    for k in range(6):
        write_sample(tmp_path, "train", f"{k}.jpg", _jpeg(seed=k), BOX)
    write_sample(tmp_path, "train", "cut.jpg", _cut_with_end_marker(_jpeg(seed=9)), BOX)
    scan = scan_dataset(tmp_path / "images" / "train", nc=1, workers=2)
    assert scan.counts == {"found": 6, "missing": 0, "empty": 0, "corrupt": 1}
    assert any("cut.jpg: image skipped: corrupt JPEG data" in w for w in _warnings(caplog))


# ------------------------------------------------------------------------------ item 8
def _labelled(tmp_path, rows_per_image: list[str]) -> str:
    for k, rows in enumerate(rows_per_image):
        write_sample(tmp_path, "train", f"{k}.png", _photo(64, 64, seed=k), rows)
    return tmp_path / "images" / "train"


def _rows(*classes: int) -> str:
    return "".join(f"{c} 0.{k + 1} 0.5 0.05 0.05\n" for k, c in enumerate(classes))


def test_summary_counts_dropped_boxes_by_reason(tmp_path, caplog):
    images = _labelled(tmp_path, [_rows(0, 1, 2, 5), _rows(0, 1) + "0 0.1 0.5 0.05 0.05\n", _rows(2, 1, 0)])
    caplog.set_level(logging.INFO, logger="vitdet")
    scan = scan_dataset(images, nc=3)
    assert scan.counts == {"found": 3, "missing": 0, "empty": 0, "corrupt": 0}
    assert scan.rows == 10
    assert scan.dropped == {"class id not an integer in 0..2 (the dataset has 3 names)": 1, "duplicate": 1}
    (summary,) = [line for line in _infos(caplog) if " boxes: " in line]
    assert "dropped 2 of 10 boxes: 1 class id not an integer in 0..2" in summary and "1 duplicate" in summary


def test_names_shorter_than_the_class_ids_stops_and_says_so(tmp_path, caplog):
    images = _labelled(tmp_path, [_rows(0, 1, 2, 3)] * 4)  # ids 0..3, names has one entry
    caplog.set_level(logging.INFO, logger="vitdet")
    with pytest.raises(MostLabelsDroppedError) as err:
        scan_dataset(images, nc=1, names_source="configs/data/mine.yaml")
    message = str(err.value)
    assert "12 of 16 boxes (75%)" in message and "class id not an integer in 0" in message
    assert "configs/data/mine.yaml" in message and "`names`" in message
    assert "1 entry" in message and "largest class id in the labels is 3" in message
    assert any("dropped 12 of 16 boxes" in line for line in _infos(caplog))
    with pytest.raises(MostLabelsDroppedError, match="largest class id in the labels is 3"):
        scan_dataset(images, nc=1)  # from the cache: still stops
    with pytest.raises(MostLabelsDroppedError, match="mine.yaml"):
        LoadImagesAndLabels(images, 64, names=["only"], names_source="configs/data/mine.yaml")


def test_half_the_boxes_dropped_is_still_a_warning_not_a_stop(tmp_path):
    images = _labelled(tmp_path, [_rows(0, 1), _rows(0, 1)])
    scan = scan_dataset(images, nc=1)
    assert scan.rows == 4 and sum(scan.dropped.values()) == 2 and scan.counts["found"] == 2


def test_most_boxes_in_pixels_stops_with_a_hint(tmp_path):
    pixel_rows = "0 32 32 10 10\n0 20 20 8 8\n0 0.5 0.5 0.1 0.1\n"
    images = _labelled(tmp_path, [pixel_rows])
    with pytest.raises(MostLabelsDroppedError, match=r"2 of 3 boxes \(67%\).*normalised"):
        scan_dataset(images, nc=1)
