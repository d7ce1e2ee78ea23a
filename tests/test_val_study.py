"""val.py --task study: every file in one run folder (none in the current directory), study.png included."""

from __future__ import annotations

import numpy as np

from engine.evaluation import EvalOptions, study


def test_study_writes_its_table_and_plot_into_the_run_folder(tiny_data, tiny_checkpoint, tmp_path,
                                                             monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    options = EvalOptions(data=str(tiny_data), weights=str(tiny_checkpoint), batch_size=4, workers=0,
                          project=str(tmp_path / "runs"), name="study", device="cpu")
    folder = study(options, sizes=(64, 96))
    assert folder == tmp_path / "runs" / "study" and not list(cwd.iterdir())
    table = folder / f"study_{tiny_data.stem}_{tiny_checkpoint.stem}.txt"
    rows = np.loadtxt(table, ndmin=2)
    assert rows.shape == (2, 8) and rows[:, 0].tolist() == [64, 96]
    assert ((rows[:, 1:5] >= 0) & (rows[:, 1:5] <= 1)).all() and (rows[:, 6] > 0).all()
    assert (folder / "study.png").stat().st_size > 10_000
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [f"{tiny_checkpoint.stem}_64",
                                                                       f"{tiny_checkpoint.stem}_96"]
    assert study(options, sizes=(64,)) == tmp_path / "runs" / "study2"  # a second study never reuses it
