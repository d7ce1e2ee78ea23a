"""Hyperparameter evolution: YOLOv5's mutation rule and ranges, evolve.csv, hyp_evolve.yaml, evolve.png,
and an evolution continued with --resume-evolve."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

import train
from engine.evolve import (
    MUTATION_RANGES, RESULT_KEYS, append_generation, best_hyp, evolved_keys, generation_rng, mutate,
    read_evolve_csv,
)
from utils.general import resolve_config, yaml_load

HYP = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))


def _rows(fitness_values: list[float], hyp=HYP) -> np.ndarray:
    keys = evolved_keys(hyp)
    return np.array([[0, 0, f, f, 0, 0, 0, *(hyp[k] for k in keys)] for f in fitness_values], dtype=float)


def test_first_generation_trains_the_given_hyperparameters():
    assert mutate(HYP, np.zeros((0, 7)), generation_rng(0, 0)) == {k: round(v, 5) for k, v in HYP.items()}


def test_children_stay_in_range_differ_from_the_parent_and_keep_fixed_keys():
    rows = _rows([0.2, 0.5, 0.4])
    for generation in range(20):
        child = mutate(HYP, rows, generation_rng(0, generation))
        changed = [k for k in evolved_keys(HYP) if child[k] != HYP[k]]
        assert changed, "at least one key mutates"
        for key in evolved_keys(HYP):
            scale, low, high = MUTATION_RANGES[key]
            assert low <= child[key] <= high, (key, child[key])
            if scale == 0:  # iou_t, fl_gamma, perspective, fliplr never evolve
                assert child[key] == HYP[key], key


def test_mutation_is_reproducible_from_seed_and_generation():
    rows = _rows([0.2, 0.5])
    assert mutate(HYP, rows, generation_rng(3, 7)) == mutate(HYP, rows, generation_rng(3, 7))
    assert mutate(HYP, rows, generation_rng(3, 7)) != mutate(HYP, rows, generation_rng(3, 8))


def test_parents_are_the_fittest_rows():
    fit_hyp, weak_hyp = {**HYP, "lr0": 0.05}, {**HYP, "lr0": 0.0001}
    rows = np.vstack([_rows([0.9], fit_hyp), _rows([0.0] * 10, weak_hyp)])
    picks = [mutate(HYP, rows, generation_rng(0, g))["lr0"] for g in range(30)]
    # five parents at most: the fit one and four weak ones, chosen by fitness weight (weak ones ~1e-6)
    assert all(p >= 0.05 * 0.3 - 1e-9 for p in picks)


def test_evolve_csv_round_trip_and_best(tmp_path):
    file = tmp_path / "evolve.csv"
    append_generation(file, [0.5, 0.5, 0.3, 0.1, 0.01, 0.02, 0.03], HYP)
    rows = append_generation(file, [0.6, 0.6, 0.7, 0.4, 0.01, 0.02, 0.03], {**HYP, "lr0": 0.02})
    columns, read = read_evolve_csv(file)
    assert columns == evolved_keys(HYP) and read.shape == (2, 7 + len(columns))
    assert np.allclose(read, rows, rtol=1e-4)
    generation, best = best_hyp(read, HYP)
    assert generation == 1 and best["lr0"] == pytest.approx(0.02)
    with open(file) as f:
        assert f.readline().strip().split(",")[:7] == list(RESULT_KEYS)


def test_resume_evolve_needs_a_generation_count(capsys):
    with pytest.raises(SystemExit):
        train.main(["--cfg", "yolov5n.yaml", "--resume-evolve", "runs/evolve/exp"])
    assert "--evolve N" in capsys.readouterr().err


@pytest.mark.slow
def test_two_generations_then_a_third_after_resume_evolve(tmp_path, tiny_data):
    args = ["--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "96", "--batch-size",
            "8", "--workers", "0", "--noautoanchor", "--noplots", "--project", str(tmp_path), "--name", "evo"]
    assert train.main([*args, "--evolve", "2"]) == 0
    folder = tmp_path / "evo"
    columns, rows = read_evolve_csv(folder / "evolve.csv")
    assert rows.shape == (2, 7 + len(columns))
    assert (folder / "evolve.png").stat().st_size > 0
    best = yaml.safe_load((folder / "hyp_evolve.yaml").read_text())
    assert set(best) == set(HYP)
    for generation in (0, 1):  # each generation is a normal run with its own checkpoints
        assert (folder / f"gen{generation}" / "weights" / "last.pt").is_file()
    gen1 = yaml.safe_load((folder / "gen1" / "hyp.yaml").read_text())
    assert gen1 != HYP and all(gen1[k] == pytest.approx(rows[1, 7 + i]) for i, k in enumerate(columns))

    assert train.main([*args, "--evolve", "1", "--resume-evolve", str(folder)]) == 0
    assert read_evolve_csv(folder / "evolve.csv")[1].shape[0] == 3
    assert (folder / "gen2" / "weights" / "last.pt").is_file()


@pytest.mark.slow
def test_evolve_under_ddp_writes_one_evolution(tmp_path, tiny_data):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    args = ["--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "96", "--batch-size",
            "8", "--workers", "0", "--noautoanchor", "--noplots", "--device", "cpu", "--project", str(tmp_path),
            "--name", "ddp", "--evolve", "2"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", "train.py", *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    columns, rows = read_evolve_csv(tmp_path / "ddp" / "evolve.csv")
    assert rows.shape == (2, 7 + len(columns))  # rank 0 wrote each generation once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # rank 1 made no folder of its own
    gen1 = yaml.safe_load((tmp_path / "ddp" / "gen1" / "hyp.yaml").read_text())
    assert all(gen1[k] == pytest.approx(rows[1, 7 + i]) for i, k in enumerate(columns))
