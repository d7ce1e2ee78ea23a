"""Hyperparameter evolution (YOLOv5's `train.py --evolve`): mutate, train, keep the fittest.

Generation 0 trains the hyperparameters as given. Every later generation picks a parent among the
five fittest rows of evolve.csv (chosen at random, weighted by fitness), multiplies each evolvable
value by a random factor (YOLOv5's rule: with probability 0.8 per key, factor 1 + N(0, 1) * U(0, 1) *
0.2 * the key's mutation scale, clipped to [0.3, 3]) and clips it to the key's range. Each generation
is a normal run in its own folder (gen0, gen1, ... inside the evolve folder, checkpoints as usual);
its final P, R, mAP50, mAP50-95 and validation losses are appended to evolve.csv with its
hyperparameters. hyp_evolve.yaml holds the best row so far and evolve.png plots fitness against
every hyperparameter. The random streams are seeded by (--seed, generation), so an evolution is
reproducible and a resumed one (`--resume-evolve`) continues as if it had never stopped.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from utils.files import atomic_write_text
from utils.metrics import fitness

LOGGER = logging.getLogger(f"vitdet.{__name__}")
RESULT_KEYS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
               "val/box_loss", "val/obj_loss", "val/cls_loss")
# key: (mutation scale (0 = fixed), lower limit, upper limit), YOLOv5's table
MUTATION_RANGES: dict[str, tuple[float, float, float]] = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98),
    "weight_decay": (1, 0.0, 0.001), "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95),
    "warmup_bias_lr": (1, 0.0, 0.2), "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0),
    "obj": (1, 0.2, 4.0), "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0),
    "anchors": (2, 2.0, 10.0), "fl_gamma": (0, 0.0, 2.0), "hsv_h": (1, 0.0, 0.1), "hsv_s": (1, 0.0, 0.9),
    "hsv_v": (1, 0.0, 0.9), "degrees": (1, 0.0, 45.0), "translate": (1, 0.0, 0.9), "scale": (1, 0.0, 0.9),
    "shear": (1, 0.0, 10.0), "perspective": (0, 0.0, 0.001), "flipud": (1, 0.0, 1.0), "fliplr": (0, 0.0, 1.0),
    "mosaic": (1, 0.0, 1.0), "mixup": (1, 0.0, 1.0), "copy_paste": (1, 0.0, 1.0),
}  # fmt: skip
MUTATION_PROBABILITY, SIGMA, PARENTS = 0.8, 0.2, 5


def evolved_keys(hyp: Mapping[str, Any]) -> list[str]:
    """The keys of `hyp` that evolution may change, in the hyp file's order (columns of evolve.csv)."""
    return [k for k in hyp if k in MUTATION_RANGES]


def read_evolve_csv(file: Path) -> tuple[list[str], np.ndarray]:
    """(hyperparameter columns, rows (n, 7 + len(columns))) of an evolve.csv; no file = no rows."""
    if not file.exists():
        return [], np.zeros((0, len(RESULT_KEYS)))
    with open(file, newline="") as f:
        table = [[cell.strip() for cell in row] for row in csv.reader(f) if row]
    header, rows = table[0], table[1:]
    if tuple(header[: len(RESULT_KEYS)]) != RESULT_KEYS:
        raise ValueError(f"{file}: not an evolve.csv (its first columns must be {', '.join(RESULT_KEYS)})")
    values = np.array([[float(v) for v in row] for row in rows], dtype=float).reshape(len(rows), len(header))
    return header[len(RESULT_KEYS):], values


def append_generation(file: Path, results: list[float], hyp: Mapping[str, Any]) -> np.ndarray:
    """Add one generation's 7 results and its evolved hyperparameters to evolve.csv (written
    atomically); returns all rows."""
    keys = evolved_keys(hyp)
    columns, rows = read_evolve_csv(file)
    if rows.shape[0] and columns != keys:
        raise ValueError(f"{file}: its columns {columns} do not match the hyperparameters {keys}")
    rows = np.vstack([rows.reshape(-1, len(RESULT_KEYS) + len(keys)), [[*results, *(hyp[k] for k in keys)]]])
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([*RESULT_KEYS, *keys])
    writer.writerows([[f"{v:.8g}" for v in row] for row in rows])  # hyp values keep all 5 decimals
    atomic_write_text(file, text.getvalue())
    return rows


def mutate(hyp: Mapping[str, Any], rows: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """A child of the fittest rows of evolve.csv (or `hyp` itself while there are none), clipped to
    MUTATION_RANGES and rounded to 5 decimals; keys that do not evolve keep their value."""
    keys = evolved_keys(hyp)
    child = dict(hyp)
    if len(rows):
        best = rows[np.argsort(-fitness(rows))][:PARENTS]
        weights = fitness(best) - fitness(best).min() + 1e-6
        parent = best[rng.choice(len(best), p=weights / weights.sum())]
        scales = np.array([MUTATION_RANGES[k][0] for k in keys])
        factors = np.ones(len(keys))
        while np.all(factors == 1):  # mutate at least one key
            mask = rng.random(len(keys)) < MUTATION_PROBABILITY
            factors = (scales * mask * rng.standard_normal(len(keys)) * rng.random() * SIGMA + 1).clip(0.3, 3.0)
        for i, key in enumerate(keys):
            child[key] = float(parent[len(RESULT_KEYS) + i] * factors[i])
    for key in keys:
        _, low, high = MUTATION_RANGES[key]
        child[key] = round(min(max(float(child[key]), low), high), 5)
    return child


def best_hyp(rows: np.ndarray, hyp: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """(generation, hyperparameters) of the fittest row."""
    index = int(np.argmax(fitness(rows)))
    best = dict(hyp)
    for i, key in enumerate(evolved_keys(hyp)):
        best[key] = float(rows[index, len(RESULT_KEYS) + i])
    return index, best


def write_best(folder: Path, rows: np.ndarray, hyp: Mapping[str, Any]) -> Path:
    """hyp_evolve.yaml: the best hyperparameters, with a header saying which generation and result."""
    index, best = best_hyp(rows, hyp)
    results = ", ".join(f"{k} {v:.4g}" for k, v in zip(RESULT_KEYS, rows[index]))
    header = (f"# YOLOv5-style hyperparameter evolution: best of {len(rows)} generations is generation "
              f"{index}\n# {results}\n")
    path = folder / "hyp_evolve.yaml"
    atomic_write_text(path, header + yaml.safe_dump(best, sort_keys=False))
    return path


def generation_rng(seed: int, generation: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0xE70, generation])


def evolve(options, device, generations: int, folder: Path) -> Path:
    """Run `generations` more generations into `folder` (gen<k>/ per generation, evolve.csv,
    hyp_evolve.yaml, evolve.png); continues an evolve.csv already there. Under DDP every rank trains
    each generation and rank 0 chooses the mutation, writes the files and shares the hyp; returns the
    path of hyp_evolve.yaml."""
    import dataclasses

    from engine.trainer import Trainer, distributed_env
    from utils.plots import plot_evolve

    is_main = distributed_env()[1] in (-1, 0)
    csv_file = folder / "evolve.csv"
    for _ in range(generations):
        rows = read_evolve_csv(csv_file)[1] if is_main else None
        generation = _shared(len(rows) if is_main else 0)
        hyp = _shared(mutate(options.hyp, rows, generation_rng(options.seed, generation)) if is_main else None)
        LOGGER.info(f"Evolve: generation {generation} in {folder / f'gen{generation}'}: "
                    + ", ".join(f"{k}={hyp[k]:g}" for k in evolved_keys(hyp)))
        run = dataclasses.replace(options, hyp=hyp, save_dir=str(folder / f"gen{generation}"), resume=False,
                                  resume_path="")
        trainer = Trainer(run, device)
        trainer.run()
        if is_main:
            results = trainer.val_results.as_row() if trainer.val_results is not None else [0.0] * 7
            rows = append_generation(csv_file, results, hyp)
            write_best(folder, rows, options.hyp)
            plot_evolve(csv_file)
    best = folder / "hyp_evolve.yaml"
    if is_main:
        LOGGER.info(f"Evolve: {len(read_evolve_csv(csv_file)[1])} generations in {csv_file}; best "
                    f"hyperparameters in {best}. Train with them: python train.py --hyp {best}")
    return best


def _shared(value):
    """`value` as rank 0 has it, on every rank (the value itself without DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]
