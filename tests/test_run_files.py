"""What a training run leaves on disk after kills, resumes, reused folders, failed starts and a full disk:
best.pt and last.pt consistent, no temp files, one results.csv row per epoch, no empty run folders."""

from __future__ import annotations

import csv
import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
import utils.files
from engine.callbacks import Checkpointer
from engine.checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from models.yolo import DetectionModel

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--cfg", "yolov5n.yaml", "--imgsz", "96", "--batch-size", "8", "--workers", "0", "--noautoanchor",
        "--noplots", "--deterministic"]


def _rows(run: Path) -> list[list[str]]:
    with open(run / "results.csv") as f:
        return list(csv.reader(f))


def _weights_equal(a: Path, b: Path) -> bool:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _child(kill_at: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "kill_during_saves.py"), str(kill_at), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _killed_point(stderr: str) -> str | None:
    """'mid-save best.pt' / 'after-rename last.pt' ... from the helper's KILLED line."""
    for line in stderr.splitlines():
        if line.startswith("KILLED "):
            _, kind, name = line.split(" ", 2)
            for target in ("best.pt", "last.pt", "results.csv", "opt.yaml", "hyp.yaml"):
                if target in name:
                    return f"{kind} {target}"
            return f"{kind} {name}"
    return None


@pytest.mark.slow
def test_kills_around_every_save_then_resume_end_like_an_unbroken_run(tmp_path, tiny_data):
    epochs = ["--epochs", "4", "--data", str(tiny_data), "--project", str(tmp_path)]
    reference = _child(0, [*FAST, *epochs, "--name", "unbroken"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run, covered = tmp_path / "killed", set()
    last = run / "weights" / "last.pt"

    def finished() -> bool:  # a kill right after the final last.pt leaves nothing to resume
        return last.exists() and load_checkpoint(last)["epoch"] == 3

    for kill_at in [1, 2, 3, 4, 5, 6, 2, 3, 4, 5, 7, 8, 1, 2, 3, 4, 9, 10, 11]:
        if finished():
            break
        args = ["--resume", str(last)] if last.exists() else [*FAST, *epochs, "--name", "killed", "--exist-ok"]
        result = _child(kill_at, args)
        point = _killed_point(result.stderr)
        if point is None:  # the run finished before reaching that event
            assert result.returncode == 0, result.stderr[-3000:]
            break
        covered.add(point)
        if last.exists():
            assert load_checkpoint(last)["epoch"] >= 0  # whatever the kill hit, last.pt loads
    if not finished():
        result = _child(0, ["--resume", str(last)])
        assert result.returncode == 0, result.stderr[-3000:]

    assert covered >= {"mid-save best.pt", "after-rename best.pt", "mid-save last.pt", "after-rename last.pt",
                       "after-rename results.csv"}, covered
    unbroken = tmp_path / "unbroken"
    assert _rows(run) == _rows(unbroken)
    assert [row[0] for row in _rows(run)[1:]] == ["0", "1", "2", "3"]
    assert _weights_equal(last, unbroken / "weights" / "last.pt")
    assert _weights_equal(run / "weights" / "best.pt", unbroken / "weights" / "best.pt")
    assert load_checkpoint(run / "weights" / "best.pt")["epoch"] == load_checkpoint(
        unbroken / "weights" / "best.pt")["epoch"]
    assert not [p.name for p in run.rglob("*") if p.name.startswith(".")]  # no temp file left


def test_best_is_written_before_last(monkeypatch, tmp_path):
    """A kill between the two writes must leave last.pt behind (the epoch is repeated), not best.pt."""
    written = []
    monkeypatch.setattr("engine.callbacks.save_checkpoint", lambda ckpt, path: written.append(path.name))

    class Run:
        options = train.TrainOptions(save_period=-1)
        weights_dir = tmp_path
        best_fitness = fitness = 0.5
        epoch = 0

        def is_final_epoch(self):
            return False

        def checkpoint(self):
            return {}

    Checkpointer().after_epoch(Run())
    assert written == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_reused_folder_gets_a_fresh_csv_and_no_stale_temp_files(tmp_path, tiny_data):
    run = tmp_path / "exp"
    (run / "weights").mkdir(parents=True)
    (run / "results.csv").write_text("epoch,old\n0,1\n1,2\n5,3\n")
    stale = [run / "weights" / ".last.pt.1a2b3c4d.tmp", run / "weights" / ".best.pt.tmpxyz.tmp"]
    for file in stale:
        file.write_bytes(b"half a checkpoint")
    keep = run / "weights" / "notes.txt"
    keep.write_text("mine")
    assert train.main([*FAST, "--epochs", "1", "--data", str(tiny_data), "--project", str(tmp_path),
                       "--name", "exp", "--exist-ok"]) == 0
    rows = _rows(run)
    assert rows[0][0] == "epoch" and rows[0][1] == "train/box_loss" and [r[0] for r in rows[1:]] == ["0"]
    assert not any(f.exists() for f in stale) and keep.read_text() == "mine"


def test_resumed_csv_keeps_one_row_per_earlier_epoch(tmp_path):
    from engine.callbacks import ResultsCSV, result_columns

    file = tmp_path / "results.csv"
    rows = [result_columns(3), *[[str(e), "0.1"] for e in (0, 0, 1, 0, 2, 1, 3)]]
    with open(file, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    kept = ResultsCSV._kept_rows(file, start_epoch=3)
    assert [r[0] for r in kept] == ["0", "1", "2"]
    assert ResultsCSV._kept_rows(file, start_epoch=0) == []  # a fresh run starts a fresh file


def test_failed_starts_leave_no_run_folders(tmp_path, tiny_data):
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            train.main(["--cfg", "yolov5n.yaml", "--data", str(tmp_path / "missing.yaml"), "--project",
                        str(tmp_path / "runs"), "--epochs", "1"])
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_existing_folder_is_kept_when_a_start_fails(tmp_path):
    run = tmp_path / "runs" / "exp"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "last.pt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(FileNotFoundError):
        train.main(["--cfg", "yolov5n.yaml", "--data", str(tmp_path / "missing.yaml"), "--project",
                    str(tmp_path / "runs"), "--name", "exp", "--exist-ok", "--epochs", "1"])
    assert (run / "weights" / "last.pt").read_bytes() == b"an earlier run's checkpoint"


class _FullDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: writes past that fail with ENOSPC, as a full disk does."""

    def __init__(self, room: int):
        self.room, self.name = room, "full"

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return len(data)


def test_disk_full_while_saving_names_the_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = DetectionModel("yolov5n.yaml", nc=2)
    model.names = ["a", "b"]
    target = tmp_path / "last.pt"
    save_checkpoint(checkpoint_dict(model, epoch=1), target)
    before = target.read_bytes()
    monkeypatch.setattr(utils.files, "open", lambda path, mode: _FullDisk(room=4096), raising=False)
    with pytest.raises(OSError) as info:
        save_checkpoint(checkpoint_dict(model, epoch=2), target)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == f"[Errno 28] no space left on device while writing {target} (the previous file, " \
                              f"if any, is kept)"
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_bad_hyp_file_is_refused_whole_before_any_folder_exists(tmp_path, tiny_data):
    hyp = (ROOT / "configs" / "hyps" / "hyp.scratch-low.yaml").read_text()
    yaml_text = hyp.replace("lr0: 0.01", "").replace("mosaic: 1.0", 'mosaic: "yes"').replace("fliplr: 0.5", "fliplr: 7")
    bad = tmp_path / "bad_hyp.yaml"
    bad.write_text(yaml_text + "flipLR: 0.5\n")
    with pytest.raises(ValueError) as info:
        train.main([*FAST, "--epochs", "1", "--data", str(tiny_data), "--hyp", str(bad), "--project",
                    str(tmp_path / "runs")])
    message = str(info.value)
    for part in (str(bad), "lr0", "mosaic", "fliplr", "flipLR", "did you mean 'fliplr'"):
        assert part in message, (part, message)
    assert not (tmp_path / "runs").exists()
