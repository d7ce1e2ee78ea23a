"""The training loop behind train.py (YOLOv5's train.train, split into short steps).

One `Trainer` per process. Under `torchrun`, rank 0 writes every artefact and validates; all ranks
train on their share of each batch. Checkpoints are written atomically (see utils/checkpoint.py).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from models.backbones import Backbone
from models.yolo import DetectionModel
from utils.checkpoint import checkpoint_dict, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.general import yaml_save
from utils.loss import ComputeLoss, scale_loss_gains
from utils.metrics import fitness
from utils.optim import (
    ModelEMA, clip_gradients, de_parallel, lr_lambda, scale_weight_decay, smart_optimizer, warmup_iterations,
    warmup_step,
)
from utils.torch_utils import init_seeds
from utils.validator import run_validation

LOGGER = logging.getLogger("vitdet")
NOMINAL_BATCH = 64  # YOLOv5's nbs: gradients are accumulated up to this many images per step
RESULT_COLUMNS = (
    "epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
    "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss",
    "x/lr0", "x/lr1", "x/lr2",
)


def distributed_env() -> tuple[int, int, int]:
    """(LOCAL_RANK, RANK, WORLD_SIZE) as torchrun sets them; (-1, -1, 1) for a single process."""
    return (int(os.getenv("LOCAL_RANK", -1)), int(os.getenv("RANK", -1)), int(os.getenv("WORLD_SIZE", 1)))


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs (0 disables)."""

    def __init__(self, patience: int = 30):
        self.best_fitness, self.best_epoch = 0.0, 0
        self.patience = patience or float("inf")
        self.possible_stop = False

    def __call__(self, epoch: int, fitness_value: float) -> bool:
        if fitness_value >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fitness_value
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early as no improvement observed in last {self.patience} epochs. "
                        f"Best results observed at epoch {self.best_epoch}.")
        return stop


def transfer_weights(model: DetectionModel, ckpt: dict, exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    """Copy checkpoint tensors whose name and shape match into `model`; returns (transferred, total)."""
    source = ckpt.get("ema") or ckpt["model"]
    ours = model.state_dict()
    matched = {k: v for k, v in source.items()
               if k in ours and v.shape == ours[k].shape and not any(x in k for x in exclude)}
    model.load_state_dict(matched, strict=False)
    skipped = sorted(set(ours) - set(matched))
    if skipped:
        LOGGER.info(f"Not transferred ({len(skipped)}): {', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}")
    return len(matched), len(ours)


def freeze_layers(model: DetectionModel, freeze: list[str] | list[int]) -> list[str]:
    """Freeze parameters by layer: [N] = first N layers, [a, b, ...] = those layers, ['backbone'] = the
    backbone node (model.0) when the YAML has one, else the layers of the YAML's backbone section."""
    if freeze == ["backbone"]:
        if isinstance(model.model[0], Backbone):
            prefixes = ["model.0."]
        else:
            prefixes = [f"model.{i}." for i in range(len(model.yaml["backbone"]))]
    else:
        layers = range(int(freeze[0])) if len(freeze) == 1 else [int(x) for x in freeze]
        prefixes = [f"model.{i}." for i in layers]
    frozen = []
    for name, p in model.named_parameters():
        if any(name.startswith(x) for x in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    if frozen:
        LOGGER.info(f"Froze {len(frozen)} parameter tensors ({', '.join(prefixes[:4])}{' ...' if len(prefixes) > 4 else ''})")
    return frozen


class Trainer:
    """Holds the state of one training run; `run()` trains and returns the final validation results."""

    def __init__(self, opt: Namespace, hyp: dict, device: torch.device, save_dir: Path):
        self.opt, self.device, self.save_dir = opt, device, save_dir
        self.local_rank, self.rank, self.world_size = distributed_env()
        self.main = self.rank in (-1, 0)
        self.hyp_in = dict(hyp)  # as given: what checkpoints store (setup scales weight decay for the batch)
        self.hyp = dict(hyp)
        self.wdir = save_dir / "weights"
        self.amp = device.type == "cuda"
        self.resume_ckpt = load_checkpoint(opt.resume_path) if getattr(opt, "resume_path", None) else None

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        from data.config import check_dataset

        opt = self.opt
        init_seeds(opt.seed + 1 + max(self.rank, 0), deterministic=opt.deterministic)
        self.data = check_dataset(opt.data)
        self.nc = 1 if opt.single_cls else int(self.data["nc"])
        self.names = ["item"] if opt.single_cls and len(self.data["names"]) != 1 else list(self.data["names"])
        self.model = self._build_model().to(self.device)
        self.gs = max(int(self.model.stride.max()), 32)
        if opt.imgsz % self.gs:
            raise ValueError(f"--imgsz {opt.imgsz} must be a multiple of the max stride {self.gs}")
        self.batch_size = opt.batch_size
        self.accumulate = max(round(NOMINAL_BATCH / self.batch_size), 1)
        self.hyp["weight_decay"] = scale_weight_decay(self.hyp["weight_decay"], self.batch_size, NOMINAL_BATCH)
        self.optimizer = smart_optimizer(self.model, opt.optimizer, self.hyp["lr0"], self.hyp["momentum"],
                                         self.hyp["weight_decay"])
        self.lf = lr_lambda(opt.epochs, self.hyp["lrf"], opt.cos_lr)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.ema = ModelEMA(self.model) if self.main else None
        self.start_epoch, self.best_fitness = 0, 0.0
        self.last_opt_step = -1  # iteration of the last optimizer step (accumulation spans epochs)
        self._make_loaders()
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        elif not opt.noautoanchor:
            from utils.autoanchor import check_anchors

            check_anchors(self.train_set, self.model, thr=self.hyp["anchor_t"], imgsz=opt.imgsz, seed=opt.seed)
            if self.ema is not None:
                self.ema.ema.model[-1].anchors.copy_(self.model.model[-1].anchors)
        self._attach_hyp()
        if self.main and not opt.noplots and self.resume_ckpt is None:
            from utils.plots import plot_labels

            labels = np.concatenate([lb for lb in self.train_set.labels if len(lb)] or [np.zeros((0, 5))], 0)
            plot_labels(labels, self.names, self.save_dir)
        self.net = self._wrap_ddp(self.model)

    def _build_model(self) -> DetectionModel:
        opt = self.opt
        if self.resume_ckpt is not None:
            model = DetectionModel(self.resume_ckpt["yaml"], nc=self.nc)
            model.load_state_dict(self.resume_ckpt["model"], strict=True)
            return model
        if opt.weights:
            ckpt = load_checkpoint(opt.weights)
            model = DetectionModel(opt.cfg or ckpt["yaml"], nc=self.nc)
            exclude = ("anchors",) if opt.cfg or self.hyp.get("anchors") else ()
            done, total = transfer_weights(model, ckpt, exclude)
            LOGGER.info(f"Transferred {done}/{total} items from {opt.weights}")
        else:
            model = DetectionModel(opt.cfg, nc=self.nc)
        if opt.freeze:
            freeze_layers(model, opt.freeze)
        return model

    def _attach_hyp(self) -> None:
        """Scale the loss gains to this model and image size (YOLOv5) and attach hyp/names to the model."""
        nl = self.model.model[-1].nl
        self.scaled_hyp = scale_loss_gains(self.hyp, nl, self.nc, self.opt.imgsz)
        self.scaled_hyp["label_smoothing"] = self.opt.label_smoothing
        self.model.hyp, self.model.names, self.model.nc = self.scaled_hyp, self.names, self.nc

    def _make_loaders(self) -> None:
        from data.loaders import create_dataloader

        opt = self.opt
        per_rank = self.batch_size // self.world_size
        self.train_loader, self.train_set = create_dataloader(
            self.data["train"], opt.imgsz, per_rank, self.gs, opt.single_cls, hyp=self.hyp, augment=True,
            cache=opt.cache or False, rect=opt.rect, rank=self.local_rank, workers=opt.workers, prefix="train: ",
            shuffle=True, seed=opt.seed, names=self.data["names"],
        )
        labels = [lb for lb in self.train_set.labels if len(lb)]
        if labels and (max_cls := int(np.concatenate(labels, 0)[:, 0].max())) >= self.nc:
            raise ValueError(f"label class {max_cls} exceeds nc={self.nc} in {opt.data}; allowed 0..{self.nc - 1}")
        self.val_loader = None
        if self.main and self.data.get("val"):
            self.val_loader, _ = create_dataloader(
                self.data["val"], opt.imgsz, per_rank * 2, self.gs, opt.single_cls, hyp=self.hyp, cache=opt.cache or False,
                rect=True, rank=-1, workers=opt.workers * 2, pad=0.5, prefix="val: ", names=self.data["names"],
            )

    def _wrap_ddp(self, model):
        if self.rank == -1:
            return model
        if self.opt.sync_bn and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            LOGGER.info("Using SyncBatchNorm()")
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)

    def _restore(self, ckpt: dict) -> None:
        """Resume: optimizer, scheduler, EMA, epoch, best fitness and RNG states exactly as saved."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict({"model": ckpt["ema"], "updates": ckpt["updates"]})
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best_fitness = float(ckpt["best_fitness"])
        self.last_opt_step = int(ckpt.get("last_opt_step", -1))
        self.accumulate = int(ckpt.get("accumulate", self.accumulate))
        if ckpt.get("rng") is not None:
            set_rng_state(ckpt["rng"])
        if self.start_epoch >= self.opt.epochs:
            raise ValueError(f"{self.opt.resume_path} already finished {self.start_epoch} of {self.opt.epochs} "
                             f"epochs; nothing to resume")
        LOGGER.info(f"Resuming training from {self.opt.resume_path} at epoch {self.start_epoch}")

    # -- loop --------------------------------------------------------------------------------
    def run(self):
        self.setup()
        opt = self.opt
        nb = len(self.train_loader)
        self.nw = warmup_iterations(self.hyp, nb)
        self.compute_loss = ComputeLoss(self.model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.stopper = EarlyStopping(opt.patience)
        results = None
        LOGGER.info(f"Image sizes {opt.imgsz} train, {opt.imgsz} val\nStarting training for {opt.epochs} "
                    f"epochs...\nLogging results to {self.save_dir}")
        t0 = time.time()
        for epoch in range(self.start_epoch, opt.epochs):
            t_epoch = time.time()
            mloss, images = self._train_epoch(epoch, nb)
            if self.main:
                LOGGER.info(f"epoch {epoch}: {images * self.world_size / (time.time() - t_epoch):.1f} train images/s")
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.scheduler.step()
            stop = False
            if self.main:
                results, stop = self._end_epoch(epoch, mloss, lrs)
            stop = self._broadcast_stop(stop)
            if stop:
                break
        if self.main:
            LOGGER.info(f"{epoch - self.start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
            self._finish()
        return results

    def _train_epoch(self, epoch: int, nb: int):
        opt = self.opt
        self.net.train()
        if hasattr(self.train_loader.sampler, "set_epoch"):
            self.train_loader.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        mloss = torch.zeros(3, device=self.device)
        images = 0
        bar = enumerate(self.train_loader)
        if self.main:
            LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"))
            bar = tqdm(bar, total=nb, bar_format="{l_bar}{bar:10}{r_bar}")
        self.optimizer.zero_grad()
        for i, (imgs, targets, paths, _) in bar:
            ni = i + nb * epoch
            imgs = imgs.to(self.device, non_blocking=True).float() / 255
            if ni <= self.nw:
                self.accumulate = warmup_step(self.optimizer, ni, self.nw, epoch, self.lf, self.hyp, NOMINAL_BATCH,
                                              self.batch_size)
            if opt.multi_scale:
                imgs = self._random_rescale(imgs)
            with torch.autocast(self.device.type, enabled=self.amp):
                pred = self.net(imgs)
                loss, loss_items = self.compute_loss(pred, targets.to(self.device))
                if self.rank != -1:
                    loss = loss * self.world_size  # DDP averages gradients across ranks
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} batch {i} "
                                         f"(images {', '.join(Path(p).name for p in paths[:4])}...); stopping. Try a "
                                         f"lower --hyp lr0, or check these labels")
            self.scaler.scale(loss).backward()
            if ni - self.last_opt_step >= self.accumulate:
                self._optimizer_step()
                self.last_opt_step = ni
            images += imgs.shape[0]
            if self.main:
                mloss = (mloss * i + loss_items) / (i + 1)
                mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
                bar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
                    f"{epoch}/{opt.epochs - 1}", mem, *mloss.tolist(), targets.shape[0], imgs.shape[-1]))
                if ni < 3 and not opt.noplots:
                    from utils.plots import plot_images

                    plot_images(imgs, targets, paths, self.save_dir / f"train_batch{ni}.jpg", self.names)
        return mloss, images

    def _random_rescale(self, imgs: torch.Tensor) -> torch.Tensor:
        """--multi-scale: a random size in [0.5, 1.5] x imgsz, a multiple of the max stride."""
        gs, imgsz = self.gs, self.opt.imgsz
        size = random.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
        factor = size / max(imgs.shape[2:])
        if factor == 1:
            return imgs
        shape = [math.ceil(x * factor / gs) * gs for x in imgs.shape[2:]]
        return F.interpolate(imgs, size=shape, mode="bilinear", align_corners=False)

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        clip_gradients(self.model, max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model)

    def _end_epoch(self, epoch: int, mloss: torch.Tensor, lrs: list[float]):
        opt = self.opt
        self.ema.update_attr(self.model, include=("yaml", "nc", "hyp", "names", "stride"))
        final = epoch + 1 == opt.epochs or self.stopper.possible_stop
        results = None
        if (not opt.noval or final) and self.val_loader is not None:
            results = run_validation(self.ema.ema, self.val_loader, self.names, half=self.amp,
                                     single_cls=opt.single_cls, save_dir=self.save_dir, plots=False,
                                     compute_loss=self.compute_loss, training=True)
        row = results.as_row() if results is not None else [0.0] * 7
        fi = float(fitness(np.array(row[:4]).reshape(1, -1))[0])
        stop = self.stopper(epoch, fi)
        if fi > self.best_fitness:
            self.best_fitness = fi
        self._log_row(epoch, mloss, row, lrs)
        if not opt.nosave or final:
            self._save(epoch, fi)
        return results, stop

    def _log_row(self, epoch: int, mloss: torch.Tensor, row: list[float], lrs: list[float]) -> None:
        file = self.save_dir / "results.csv"
        values = [epoch, *mloss.tolist(), *row, *lrs]
        new = not file.exists()
        with open(file, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(RESULT_COLUMNS)
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])
        if _tensorboard_writer(self) is not None:
            for k, v in zip(RESULT_COLUMNS[1:], values[1:]):
                self.tb.add_scalar(k, v, epoch)

    def _save(self, epoch: int, fi: float) -> None:
        ckpt = checkpoint_dict(
            de_parallel(self.model), self.ema.ema, epoch=epoch, best_fitness=self.best_fitness,
            updates=self.ema.updates, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            opt=_plain_opt(self.opt), hyp=self.hyp_in, rng=rng_state(), last_opt_step=self.last_opt_step,
            accumulate=self.accumulate,
        )
        save_checkpoint(ckpt, self.wdir / "last.pt")
        if self.best_fitness == fi:
            save_checkpoint(ckpt, self.wdir / "best.pt")
        if self.opt.save_period > 0 and epoch % self.opt.save_period == 0:
            save_checkpoint(ckpt, self.wdir / f"epoch{epoch}.pt")

    def _broadcast_stop(self, stop: bool) -> bool:
        if self.rank == -1:
            return stop
        flag = [stop]
        dist.broadcast_object_list(flag, 0)
        return bool(flag[0])

    def _finish(self) -> None:
        """Plot results.csv and validate best.pt once more with plots, as YOLOv5 does."""
        if not self.opt.noplots and (self.save_dir / "results.csv").exists():
            from utils.plots import plot_results

            plot_results(self.save_dir / "results.csv")
        best = self.wdir / "best.pt"
        if best.exists() and self.val_loader is not None:
            from utils.checkpoint import load_detection_model

            LOGGER.info(f"\nValidating {best}...")
            model = load_detection_model(best, self.device, fuse=True)
            self.final_results = run_validation(
                model, self.val_loader, self.names, half=self.amp, single_cls=self.opt.single_cls,
                save_dir=self.save_dir, plots=not self.opt.noplots, verbose=True,
                compute_loss=None, training=False,
            )
        LOGGER.info(f"Results saved to {self.save_dir}")


def _tensorboard_writer(trainer: Trainer):
    """A SummaryWriter when tensorboard is installed (created once), else None."""
    if not hasattr(trainer, "tb"):
        try:
            from torch.utils.tensorboard import SummaryWriter

            trainer.tb = SummaryWriter(str(trainer.save_dir))
        except ImportError:
            trainer.tb = None
    return trainer.tb


def _plain_opt(opt: Namespace) -> dict:
    """The options as primitives only (checkpoints must load with weights_only=True)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()}


def save_run_config(save_dir: Path, opt: Namespace, hyp: dict) -> None:
    yaml_save(save_dir / "hyp.yaml", hyp)
    yaml_save(save_dir / "opt.yaml", _plain_opt(opt))
