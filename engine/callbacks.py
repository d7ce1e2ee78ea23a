"""Callbacks on the training loop: everything the loop does besides training and validating.

The loop (engine/trainer.py) calls each callback at six points, in the order they were added:

    before_train(trainer)   after setup (model, optimiser, loaders, resume) and before epoch 0
    before_epoch(trainer)   trainer.epoch is the epoch about to run
    before_step(trainer)    trainer.batch = (images uint8 -> float [0, 1], targets, paths), trainer.step
    after_step(trainer)     trainer.loss_items (box, obj, cls) of this batch, trainer.mean_losses so far
    after_epoch(trainer)    trainer.val_results (or None), trainer.metrics, trainer.fitness,
                            trainer.best_fitness and trainer.lrs are set, and early stopping has
                            already decided (trainer.stop_requested); set trainer.stop_requested = True
                            to end training after this epoch
    after_train(trainer)    after the last epoch and the final validation of best.pt

A callback subclasses `Callback` and overrides the points it needs:

    class PrintFitness(Callback):
        name = "print_fitness"

        def after_epoch(self, trainer):
            print(trainer.epoch, trainer.fitness)

    Trainer(options, device, callbacks=[PrintFitness()]).run()      # the defaults, then yours

The list is the user's: each callback has a `name`, and the built-ins (`default_callbacks(options)`,
named progress, results_csv, tensorboard, plots, checkpoint) can be dropped or replaced by name
before they are handed to the trainer:

    defaults = replace_callbacks(default_callbacks(options), checkpoint=MyCheckpointer())
    Trainer(options, device, callbacks=[PrintFitness()], defaults=drop_callbacks(defaults, "tensorboard"))

Callbacks run in list order, and no built-in depends on another having run first: early stopping is
the trainer's own (`Trainer.stopper`, decided before after_epoch), not a callback. A callback with
state that must survive a resume offers `state_dict()` / `load_state_dict()` and a `state_key`; the
trainer stores it in the checkpoint under that key. Callbacks with `main_process_only = True` (all
built-ins: they write files) run on rank 0 only under torchrun; the others run on every rank.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from engine.checkpoint import save_checkpoint
from utils.files import atomic_write_text, stale_temp_files

if TYPE_CHECKING:
    from engine.trainer import Trainer, TrainOptions

LOGGER = logging.getLogger(f"vitdet.{__name__}")
LOSS_NAMES = ("box", "obj", "cls")  # Detect's loss terms, as YOLOv5 names them (DetectAF: box, dfl, cls)
METRICS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
METRIC_COLUMNS = ("epoch", *(f"train/{n}_loss" for n in LOSS_NAMES), *METRICS,
                  *(f"val/{n}_loss" for n in LOSS_NAMES))


def result_columns(n_groups: int, loss_names: tuple[str, ...] = LOSS_NAMES) -> tuple[str, ...]:
    """results.csv's header for an optimiser with `n_groups` parameter groups (one x/lr column each:
    three as in YOLOv5, more with backbone_lr_mult / layer_decay) and a criterion whose three loss terms
    are `loss_names`."""
    return ("epoch", *(f"train/{n}_loss" for n in loss_names), *METRICS, *(f"val/{n}_loss" for n in loss_names),
            *(f"x/lr{i}" for i in range(n_groups)))


def loss_names(trainer: Trainer) -> tuple[str, ...]:
    """The names of the criterion's three loss terms (`loss_names`; YOLOv5's when it declares none)."""
    return tuple(getattr(trainer.compute_loss, "loss_names", LOSS_NAMES))


class Callback:
    """No-op hooks; subclasses override the ones they need (see the module docstring)."""

    name: str = ""  # the key drop_callbacks / replace_callbacks find it by; "" = the class name
    main_process_only: bool = False  # True: only rank 0 (or a single process) runs it
    state_key: str | None = None  # set together with state_dict/load_state_dict to be checkpointed

    def before_train(self, trainer: Trainer) -> None: ...

    def before_epoch(self, trainer: Trainer) -> None: ...

    def before_step(self, trainer: Trainer) -> None: ...

    def after_step(self, trainer: Trainer) -> None: ...

    def after_epoch(self, trainer: Trainer) -> None: ...

    def after_train(self, trainer: Trainer) -> None: ...


class ProgressLog(Callback):
    """YOLOv5's per-epoch progress bar (losses, instances, size) and the epoch's images/s."""

    name, main_process_only = "progress", True

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.started = self.train_started = 0.0
        self.images = 0
        self.train_seconds = 0.0  # this epoch's batches so far: the rate leaves validation and saving out

    def before_train(self, trainer: Trainer) -> None:
        o = trainer.options
        self.train_started = time.time()
        LOGGER.info(f"Image sizes {o.imgsz} train, {o.imgsz} val\nStarting training for {o.epochs} "
                    f"epochs...\nLogging results to {trainer.save_dir}")

    def before_epoch(self, trainer: Trainer) -> None:
        losses = (f"{n}_loss" for n in loss_names(trainer))
        LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", *losses, "Instances", "Size"))
        self.bar = tqdm(total=trainer.batches_per_epoch, bar_format="{l_bar}{bar:10}{r_bar}")
        self.started, self.images, self.train_seconds = time.time(), 0, 0.0

    def after_step(self, trainer: Trainer) -> None:
        images, targets, _ = trainer.batch
        self.images += images.shape[0]
        self.train_seconds = time.time() - self.started
        mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
        self.bar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
            f"{trainer.epoch}/{trainer.options.epochs - 1}", mem, *trainer.mean_losses.tolist(), targets.shape[0],
            images.shape[-1]))
        self.bar.update(1)

    def after_epoch(self, trainer: Trainer) -> None:
        self.bar.close()
        rate = self.images * trainer.world_size / max(self.train_seconds, 1e-9)
        LOGGER.info(f"epoch {trainer.epoch}: {rate:.1f} train images/s")

    def after_train(self, trainer: Trainer) -> None:
        epochs = trainer.epoch - trainer.start_epoch + 1
        LOGGER.info(f"{epochs} epochs completed in {(time.time() - self.train_started) / 3600:.3f} hours.")


class ResultsCSV(Callback):
    """results.csv: one row per epoch in YOLOv5's columns (losses, P, R, mAPs, val losses, lrs).

    The whole file is rewritten atomically each epoch, so a kill never leaves half a row. A fresh run
    starts a fresh file (also in a reused --exist-ok folder); a resumed run keeps the rows of the
    epochs before the one it restarts at, so after any number of kills and resumes there is exactly
    one row per epoch, in order. The row is written before the epoch's checkpoint: a kill between the
    two only repeats that epoch, whose row is then replaced.
    """

    name, main_process_only = "results_csv", True

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def before_train(self, trainer: Trainer) -> None:
        self.rows = self._kept_rows(trainer.save_dir / "results.csv", trainer.start_epoch)

    @staticmethod
    def _kept_rows(file, start_epoch: int) -> list[list[str]]:
        if start_epoch == 0 or not file.exists():
            return []
        with open(file, newline="") as f:
            rows = list(csv.reader(f))[1:]
        by_epoch = {int(float(row[0])): row for row in rows if row and row[0].strip()}
        return [by_epoch[e] for e in sorted(by_epoch) if e < start_epoch]

    def after_epoch(self, trainer: Trainer) -> None:
        self.rows.append([f"{v:.6g}" if isinstance(v, float) else str(v) for v in epoch_values(trainer)])
        text = io.StringIO()
        csv.writer(text).writerows([result_columns(len(trainer.lrs), loss_names(trainer)), *self.rows])
        atomic_write_text(trainer.save_dir / "results.csv", text.getvalue())


def epoch_values(trainer: Trainer) -> list:
    """[epoch, 3 train losses, P, R, mAP50, mAP50-95, 3 val losses, lrs] of the epoch just ended."""
    return [trainer.epoch, *trainer.mean_losses.tolist(), *trainer.metrics, *trainer.lrs]


class TensorBoardLog(Callback):
    """The results.csv columns as TensorBoard scalars in the run folder (when tensorboard is installed)."""

    name, main_process_only = "tensorboard", True

    def __init__(self) -> None:
        self.writer = None

    def before_train(self, trainer: Trainer) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            LOGGER.info("tensorboard is not installed: no TensorBoard logs (results.csv has the same numbers)")
            return
        self.writer = SummaryWriter(str(trainer.save_dir))

    def after_epoch(self, trainer: Trainer) -> None:
        if self.writer is not None:
            for key, value in zip(result_columns(len(trainer.lrs), loss_names(trainer))[1:],
                                  epoch_values(trainer)[1:]):
                self.writer.add_scalar(key, value, trainer.epoch)

    def after_train(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class Plots(Callback):
    """labels.jpg (a fresh run only), the first three training mosaics and results.png at the end."""

    name, main_process_only = "plots", True

    def before_train(self, trainer: Trainer) -> None:
        if trainer.start_epoch == 0:
            from utils.plots import plot_labels

            labels = [lb for lb in trainer.train_set.labels if len(lb)]
            plot_labels(np.concatenate(labels or [np.zeros((0, 5))], 0), trainer.names, trainer.save_dir)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step < 3:
            from utils.plots import plot_images

            images, targets, paths = trainer.batch
            plot_images(images, targets, paths, trainer.save_dir / f"train_batch{trainer.step}.jpg", trainer.names)

    def after_train(self, trainer: Trainer) -> None:
        if (trainer.save_dir / "results.csv").exists():
            from utils.plots import plot_results

            plot_results(trainer.save_dir / "results.csv")


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs (0 disables); its state is checkpointed,
    so a resumed run stops at the same epoch as an unbroken one.

    Not a callback: the trainer owns it (`Trainer.stopper`) and updates it right after validating, before
    the after_epoch callbacks run, so every callback (the checkpoint included) sees this epoch's decision
    whatever its place in the list.
    """

    def __init__(self, patience: int = 30):
        self.best_fitness, self.best_epoch = 0.0, 0
        self.patience = patience or float("inf")
        self.possible_stop = False  # the next epoch may be the last: the loop validates it

    def update(self, epoch: int, fitness_value: float) -> bool:
        """Record this epoch's fitness; True when training should stop."""
        if fitness_value >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fitness_value
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        return delta >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_fitness": self.best_fitness, "best_epoch": self.best_epoch,
                "possible_stop": self.possible_stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_fitness = float(state["best_fitness"])
        self.best_epoch = int(state["best_epoch"])
        self.possible_stop = bool(state["possible_stop"])


class Checkpointer(Callback):
    """weights/best.pt when fitness reached a new best, then last.pt, every epoch; epochN.pt every
    --save-period epochs; with --nosave only the final epoch.

    best.pt is written before last.pt: a kill between the two leaves last.pt one epoch behind, so the
    resumed run repeats the epoch and rewrites best.pt itself. (The other order would leave best.pt
    one improvement behind for good: the resumed run restores the new best fitness from last.pt and
    never writes best.pt for that epoch again.) Temporary files that a killed save left behind are
    removed when a run starts or resumes.
    """

    name, main_process_only = "checkpoint", True

    def before_train(self, trainer: Trainer) -> None:
        # stale_temp_files globs, so the wildcard name also covers epochN.pt's leftovers
        for stale in stale_temp_files(trainer.weights_dir / "*.pt"):
            LOGGER.info(f"removing {stale.name}: an unfinished save of an interrupted run")
            stale.unlink(missing_ok=True)

    def after_epoch(self, trainer: Trainer) -> None:
        o = trainer.options
        if o.nosave and not trainer.is_final_epoch():
            return
        ckpt = trainer.checkpoint()
        if trainer.best_fitness == trainer.fitness:
            save_checkpoint(ckpt, trainer.weights_dir / "best.pt")
        save_checkpoint(ckpt, trainer.weights_dir / "last.pt")
        if o.save_period > 0 and trainer.epoch % o.save_period == 0:
            save_checkpoint(ckpt, trainer.weights_dir / f"epoch{trainer.epoch}.pt")


def default_callbacks(options: TrainOptions) -> list[Callback]:
    """The built-in callbacks, in the order they run: progress, results_csv, tensorboard, plots (not with
    --noplots) and checkpoint. All write files, so under torchrun only rank 0 runs them."""
    plots = [] if options.noplots else [Plots()]
    return [ProgressLog(), ResultsCSV(), TensorBoardLog(), *plots, Checkpointer()]


def callback_name(callback: Callback) -> str:
    """The name a callback is found by: its `name`, or its class name when that is empty."""
    return getattr(callback, "name", "") or type(callback).__name__


def _check_names(callbacks: list[Callback], names, action: str) -> None:
    known = [callback_name(c) for c in callbacks]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{action}: no callback named {', '.join(map(repr, unknown))}; the list holds "
                         f"{', '.join(known) or 'none'}")


def drop_callbacks(callbacks: list[Callback], *names: str) -> list[Callback]:
    """A copy of `callbacks` without the ones named; an unknown name is a ValueError listing the names."""
    _check_names(callbacks, names, "drop_callbacks")
    return [c for c in callbacks if callback_name(c) not in names]


def replace_callbacks(callbacks: list[Callback], **replacements: Callback) -> list[Callback]:
    """A copy of `callbacks` with each named one replaced in place (same position, so the same order):
    `replace_callbacks(default_callbacks(options), checkpoint=MyCheckpointer())`. An unknown name is a
    ValueError listing the names."""
    _check_names(callbacks, replacements, "replace_callbacks")
    return [replacements.get(callback_name(c), c) for c in callbacks]


def check_unique_names(callbacks: list[Callback]) -> None:
    """Names must be unique, or dropping and replacing by name would be ambiguous."""
    names = [callback_name(c) for c in callbacks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"callbacks must have unique names; {', '.join(twice)} appears more than once (set "
                         "`name` on your callback class or instance)")
