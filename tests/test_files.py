"""utils/files.py: atomic writes leave either the old file or the new one, never a part or a temp file."""

from __future__ import annotations

import os
import stat

import pytest

from utils.files import atomic_dir, atomic_open, atomic_path, atomic_write_text, stale_temp_files


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert stale_temp_files(target) == [] and sorted(tmp_path.iterdir()) == [target]


def test_a_finished_write_replaces_the_file_with_ordinary_permissions(tmp_path):
    target = tmp_path / "hyp.yaml"
    atomic_write_text(target, "lr0: 0.01\n")
    with atomic_open(target, "wb", fsync=True) as f:
        f.write(b"lr0: 0.02\n")
    assert target.read_text() == "lr0: 0.02\n"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600


def test_atomic_path_keeps_the_suffix_for_tools_that_pick_the_format_by_it(tmp_path):
    target = tmp_path / "best.onnx"
    with atomic_path(target, keep_suffix=True) as tmp:
        assert tmp.suffix == ".onnx" and tmp.parent == tmp_path and tmp.name.startswith(".best.onnx.")
        assert not tmp.exists()
        tmp.write_bytes(b"onnx")
        assert stale_temp_files(target) == [tmp]  # what a kill at this point would leave behind
    assert target.read_bytes() == b"onnx" and stale_temp_files(target) == []


def test_atomic_open_refuses_append_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_atomic_dir_replaces_or_keeps_an_existing_folder(tmp_path):
    target = tmp_path / "best_openvino_model"
    with atomic_dir(target) as tmp:
        (tmp / "a.xml").write_text("1")
    with atomic_dir(target) as tmp:  # replace=True: the new export replaces the old folder
        (tmp / "b.xml").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.xml"]
    with atomic_dir(target, replace=False) as tmp:  # a lost race: the folder already there is kept
        (tmp / "c.xml").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_openvino_model"]
