"""The built-in dataset: deterministic bytes, what it contains, atomic generation, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

import data.builtin as builtin
from data.builtin import CLASS_NAMES, generate_builtin, grain_tile, render_image
from data.verify import scan_dataset
from utils.files import atomic_dir

SMALL = {"train": 24, "val": 6}


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_byte_for_byte(tmp_path):
    first = _files(generate_builtin(tmp_path / "one", SMALL))
    second = _files(generate_builtin(tmp_path / "two", SMALL))
    assert first == second
    assert len([p for p in first if p.suffix == ".jpg"]) == 30
    other_seed = _files(generate_builtin(tmp_path / "three", SMALL, seed=1))
    assert other_seed != first


def test_samples_have_tight_boxes_on_the_drawn_shapes():
    grain, edges_touched, n_boxes = grain_tile(0), 0, 0
    for k in range(8):
        image, labels = render_image(np.random.default_rng([0, 0, k]), grain)
        h, w = image.shape[:2]
        assert 320 <= h <= 640 and 320 <= w <= 640 and image.dtype == np.uint8
        for cls, x1, y1, x2, y2 in labels:
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and 0 <= cls < len(CLASS_NAMES)
            patch = image[int(y1) : int(y2), int(x1) : int(x2)].astype(int)
            close = (np.abs(patch - np.array(builtin.CLASS_COLOURS[int(cls)])) < 70).all(-1)
            assert close.mean() > 0.2  # the box is mostly its object (occlusion is at most 25 %)
            edges_touched += sum(int(edge.any()) for edge in (close[0], close[-1], close[:, 0], close[:, -1]))
            n_boxes += 1
    # the drawn shape reaches all four sides of its box: tight (a later object may hide an edge)
    assert n_boxes >= 40 and edges_touched / (4 * n_boxes) > 0.95


def test_dataset_content_exercises_all_strides_and_classes(tmp_path):
    root = generate_builtin(tmp_path / "b", {"train": 40})
    scan = scan_dataset(root / "images" / "train", nc=len(CLASS_NAMES))
    assert scan.counts["corrupt"] == 0 and scan.counts["empty"] == 0
    assert scan.counts["missing"] >= 1  # backgrounds: images without objects
    labels = np.concatenate(scan.labels)
    sides = np.sqrt(labels[:, 3] * labels[:, 4]) * scan.shapes.mean()  # approximate pixels
    assert set(labels[:, 0].astype(int)) == set(range(len(CLASS_NAMES)))
    assert (sides < 16).sum() >= 10 and (sides > 128).sum() >= 10  # small for stride 8, large for 32
    assert np.mean([len(lb) for lb in scan.labels]) >= 6  # many objects per image
    assert (root / "builtin.yaml").is_file()


def test_a_crash_leaves_no_half_dataset(tmp_path, monkeypatch):
    calls = []

    def failing_write(*args):
        calls.append(args)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(*args)

    original = builtin._write_sample
    monkeypatch.setattr(builtin, "_write_sample", failing_write)
    with pytest.raises(OSError, match="disk full"):
        generate_builtin(tmp_path / "b", SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary folder


def test_ensure_builtin_generates_once(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "SPLITS", SMALL)
    root = builtin.ensure_builtin(tmp_path / "b")
    stamp = (root / "builtin.yaml").stat().st_mtime_ns
    assert builtin.ensure_builtin(tmp_path / "b") == root
    assert (root / "builtin.yaml").stat().st_mtime_ns == stamp


def test_losing_a_generation_race_is_harmless(tmp_path):
    winner = generate_builtin(tmp_path / "b", {"train": 2})
    with atomic_dir(winner, replace=False) as late:  # the target exists by the time this one finishes
        (late / "x").write_text("late")
    assert (winner / "builtin.yaml").is_file() and not (winner / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the loser's folder is gone


@pytest.mark.slow
def test_default_dataset_is_generated_in_under_30_seconds(tmp_path):
    start = time.perf_counter()
    root = generate_builtin(tmp_path / "builtin")
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"{elapsed:.1f} s"
    assert len(list((root / "images" / "train").iterdir())) == 256
    assert len(list((root / "images" / "val").iterdir())) == 64
