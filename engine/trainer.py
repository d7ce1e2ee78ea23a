"""The training loop behind train.py (YOLOv5's train.train, split into short steps).

    from engine.trainer import TrainOptions, Trainer
    opt = TrainOptions(cfg="yolov5n.yaml", epochs=3, imgsz=320, save_dir="runs/train/exp",
                       hyp=yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps")))
    Trainer(opt, torch.device("cpu"), callbacks=[MyCallback()]).run()

One `Trainer` per process. Under `torchrun`, rank 0 validates and writes every artefact; all ranks train
on their share of each batch. The loop itself only trains and validates: logging, results.csv,
TensorBoard, plots, early stopping and checkpoints are callbacks (engine/callbacks.py), and a user adds
one without editing the loop.

Everything a resume needs is in `state_dict()` (model, EMA, optimiser, scheduler, GradScaler, early
stopping, RNG states, epoch and step counters), and `load_state_dict()` puts it back, so a run killed
and resumed ends with the same weights as an unbroken one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from engine.callbacks import Callback, EarlyStopping, check_unique_names, default_callbacks
from engine.checkpoint import (
    check_backbone_available,
    checkpoint_dict,
    load_checkpoint,
    load_detection_model,
    rng_state,
    set_rng_state,
)
from engine.validator import Validator, ValOptions, ValResults
from engine.weights import (
    freeze_layers,
    load_backbone_weights,
    model_config_with_drop_path,
    parameter_lr_scales,
    set_requires_grad,
    transfer_weights,
)
from models.heads import is_anchor_free
from models.yolo import DetectionModel
from utils.general import yaml_save
from utils.hyp import check_hyp
from utils.loss import ComputeLoss, scale_loss_gains
from utils.loss_af import build_criterion
from utils.metrics import fitness, labels_to_class_weights, labels_to_image_weights
from utils.optim import (
    ModelEMA,
    OptimizerChoice,
    choose_optimizer,
    clip_gradients,
    de_parallel,
    lr_lambda,
    scale_weight_decay,
    smart_optimizer,
    warmup_iterations,
    warmup_step,
)
from utils.torch_utils import init_seeds, strided_pointwise_convs

LOGGER = logging.getLogger(f"vitdet.{__name__}")
NOMINAL_BATCH = 64  # YOLOv5's nbs: gradients are accumulated up to this many images per step
__all__ = ["NOMINAL_BATCH", "TrainOptions", "Trainer", "distributed_env", "save_run_config"]


def distributed_env() -> tuple[int, int, int]:
    """(LOCAL_RANK, RANK, WORLD_SIZE) as torchrun sets them; (-1, -1, 1) for a single process."""
    return (int(os.getenv("LOCAL_RANK", -1)), int(os.getenv("RANK", -1)), int(os.getenv("WORLD_SIZE", 1)))


@dataclass
class TrainOptions:
    """train.py's flags, with `hyp` holding the hyperparameter values (as YOLOv5 stores them in opt).

    The hyp values are kept as given; the trainer derives the batch-scaled weight decay and the
    model-scaled loss gains from them where it uses them.
    """

    cfg: str = ""
    weights: str = ""
    data: str = "builtin.yaml"
    hyp: dict[str, Any] = field(default_factory=dict)
    epochs: int = 100
    batch_size: int = 16
    imgsz: int = 640
    rect: bool = False
    resume: bool | str = False
    resume_path: str = ""
    nosave: bool = False
    noval: bool = False
    noautoanchor: bool = False
    noplots: bool = False
    cache: str | None = None
    multi_scale: bool = False
    single_cls: bool = False
    optimizer: str = "auto"  # auto: AdamW for short schedules, SGD for long (utils/optim.choose_optimizer)
    cos_lr: bool = False
    label_smoothing: float = 0.0
    patience: int = 100
    freeze: list[str] = field(default_factory=list)
    freeze_epochs: int = 0  # > 0: the --freeze layers train again from this epoch on (0 = frozen throughout)
    backbone_weights: str = ""  # official release or timm file for the backbone node; not kept in checkpoints
    backbone_weights_partial: bool = False  # accept a backbone file that leaves tensors without a value
    save_period: int = -1
    seed: int = 0
    deterministic: bool = False
    workers: int = 8
    device: str = ""
    sync_bn: bool = False
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    save_dir: str = "runs/train/exp"
    image_weights: bool = False  # --image-weights: sample images by their classes' weakness (YOLOv5)
    quad: bool = False  # --quad: 4 images of a batch become one at twice the size (YOLOv5's collate_fn4)
    amp: bool = False  # --amp: bf16 autocast on a CPU with native bf16 (CUDA always uses float16 AMP)
    channels_last: bool = False  # --channels-last: model weights and input batches in NHWC memory format
    compile: bool = False  # --compile: torch.compile the training forward (eager again if compiling fails)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainOptions:
        """Options from a dict (argparse's vars(), a checkpoint's 'opt'); keys we no longer have are
        dropped, new ones take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def as_plain_dict(self) -> dict[str, Any]:
        """Primitives only (checkpoints must load with weights_only=True)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


class Trainer:
    """One training run: `Trainer(options, device).run()` trains and returns the last validation results.

    All state is declared here; `setup()` builds the model, loaders, optimiser, scheduler and loss (and
    restores a checkpoint on resume); `run()` loops over epochs, calling the callbacks at each point.

    A subclass changes a part by overriding its build step (each returns the part; setup() stores it):

        build_model(resume)   -> DetectionModel   (resume: the checkpoint dict being resumed, or None)
        build_dataloaders()   -> (train_loader, train_set, val_loader or None)
        build_optimizer()     -> torch.optim.Optimizer        (self.model and self.options are set)
        build_scheduler()     -> an LR scheduler stepped once per epoch (self.optimizer is set)
        build_criterion()     -> callable(preds, targets) -> (loss scalar, loss items (3,))
        build_callbacks()     -> the default callbacks (`defaults=` replaces this list per instance)

    callbacks: added after the defaults. defaults: the default callbacks to use instead of
    `build_callbacks()` (e.g. `replace_callbacks(default_callbacks(options), checkpoint=Mine())`, or []
    for none). See engine/callbacks.py and docs/training-engine.md.
    """

    def __init__(self, options: TrainOptions, device: torch.device, callbacks: list[Callback] | None = None,
                 defaults: list[Callback] | None = None):
        self.options, self.device = options, device
        self.save_dir = Path(options.save_dir)
        self.weights_dir = self.save_dir / "weights"
        self.local_rank, self.rank, self.world_size = distributed_env()
        self.is_main = self.rank in (-1, 0)
        from engine.precision import training_autocast

        # CUDA: float16 autocast + GradScaler; CPU --amp: bf16 autocast, no scaler (needs native bf16)
        self.amp, self.amp_dtype, self.grad_scaling = training_autocast(device, options.amp)
        self.val_half = self.amp and self.amp_dtype == torch.float16
        # built by setup()
        self.data: dict[str, Any] = {}
        self.names: list[str] = []
        self.nc = 0
        self.model: DetectionModel | None = None
        self.net: torch.nn.Module | None = None  # the model, DDP-wrapped when distributed
        self.compiled_net: torch.nn.Module | None = None  # --compile: torch.compile(self.net), None if eager
        self.ema: ModelEMA | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_lambda = None
        self.scheduler: LambdaLR | None = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.grad_scaling)
        self.compute_loss: ComputeLoss | None = None
        self.train_loader = self.train_set = self.val_loader = None
        self.grid_size = 32  # max stride: image sizes are multiples of it
        self.batch_size = options.batch_size
        self.accumulate = max(round(NOMINAL_BATCH / self.batch_size), 1)
        self.batches_per_epoch = 0
        self.warmup_iterations = 0
        # progress: saved in checkpoints
        self.start_epoch = 0
        self.epoch = 0
        self.step = 0  # global batch index (epoch * batches_per_epoch + batch)
        self.last_opt_step = -1  # step of the last optimizer step (accumulation spans epochs)
        self.frozen: list[str] = []  # parameter names --freeze froze (trained again from --freeze-epochs)
        self.best_fitness = 0.0
        self.maps = np.zeros(0)  # per-class mAP50-95 of the last validation (--image-weights reads it)
        self.stopper = EarlyStopping(options.patience)
        # the current batch and epoch, for callbacks
        self.batch: tuple | None = None
        self.loss_items = torch.zeros(3)
        self.mean_losses = torch.zeros(3)
        self.lrs: list[float] = []
        self.val_results: ValResults | None = None
        self.metrics = ValResults().as_row()  # [P, R, mAP50, mAP50-95, 3 val losses]; zeros when not validated
        self.fitness = 0.0
        self.stop_requested = False
        self.final_results: ValResults | None = None
        chosen = self.build_callbacks() if defaults is None else list(defaults)
        self.callbacks: list[Callback] = [c for c in [*chosen, *(callbacks or [])]
                                          if self.is_main or not getattr(c, "main_process_only", False)]
        check_unique_names(self.callbacks)

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from data.config import check_dataset

        o = self.options
        init_seeds(o.seed + 1 + max(self.rank, 0), deterministic=o.deterministic)
        self.data = check_dataset(o.data)
        self.nc = 1 if o.single_cls else int(self.data["nc"])
        self.names = ["item"] if o.single_cls and len(self.data["names"]) != 1 else list(self.data["names"])
        resume = load_checkpoint(o.resume_path) if o.resume_path else None
        self.model = self.build_model(resume).to(self.device)
        if o.channels_last:  # the images follow in _train_step; EMA and checkpoints keep the format
            to_channels_last(self.model, self.device)
        self.grid_size = max(int(self.model.stride.max()), 32)
        if o.imgsz % self.grid_size:
            raise ValueError(f"--imgsz {o.imgsz} must be a multiple of the max stride {self.grid_size}")
        self.train_loader, self.train_set, self.val_loader = self.build_dataloaders()
        self._choose_optimizer(resume)  # the auto rule needs the train set's size
        self.optimizer = self.build_optimizer()
        self.lr_lambda = lr_lambda(o.epochs, o.hyp["lrf"], o.cos_lr)  # also the target of the warmup
        self.scheduler = self.build_scheduler()
        self.ema = ModelEMA(self.model) if self.is_main else None
        if resume is not None:
            self.load_state_dict(resume)
        elif not o.noautoanchor and not is_anchor_free(self.model.model[-1]):  # DetectAF has no anchors
            self._check_anchors()
        self._attach_hyp()
        self.batches_per_epoch = len(self.train_loader)
        self.warmup_iterations = warmup_iterations(o.hyp, self.batches_per_epoch)
        self.compute_loss = self.build_criterion()
        self.net = self._wrap_ddp(self.model)
        self.compiled_net = self._compile(self.net)

    # -- build steps: a subclass overrides these (see the class docstring) ------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        """YOLOv5's three parameter groups (per lr scale) for --optimizer, with the batch-scaled weight decay
        and the hyp's backbone_lr_mult / layer_decay."""
        o = self.options
        weight_decay = scale_weight_decay(o.hyp["weight_decay"], self.batch_size, NOMINAL_BATCH)
        lr_scales = parameter_lr_scales(self.model, o.hyp.get("backbone_lr_mult", 1.0),
                                        o.hyp.get("layer_decay", 1.0))
        return smart_optimizer(self.model, o.optimizer, o.hyp["lr0"], o.hyp["momentum"], weight_decay,
                               lr_scales=lr_scales)

    def build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The per-epoch learning-rate factor `self.lr_lambda` (linear or --cos-lr, down to lrf)."""
        return LambdaLR(self.optimizer, lr_lambda=self.lr_lambda)

    def build_criterion(self):
        """The training loss, called as `criterion(preds, targets) -> (loss, loss_items)`: loss is the
        batch's scalar (already multiplied by the batch size, as YOLOv5's), loss_items its 3 parts
        (logged as box, obj, cls). Built after the hyp is attached to the model (model.hyp)."""
        return build_criterion(self.model)  # utils.loss_af: ComputeLoss (Detect), AnchorFreeLoss (DetectAF)

    def build_callbacks(self) -> list[Callback]:
        """The default callbacks of this trainer (see engine/callbacks.default_callbacks)."""
        return default_callbacks(self.options)

    def _choose_optimizer(self, resume: dict | None) -> None:
        """Resolve --optimizer (auto by default) into an optimiser and its lr0 / momentum / warmup_bias_lr,
        written into the options and hyperparameters, so checkpoints carry the choice. A resumed run keeps
        the choice its checkpoint recorded."""
        o = self.options
        if resume is not None:
            o.optimizer = resume["opt"]["optimizer"]
            o.hyp.update({key: resume["hyp"][key] for key in OptimizerChoice.HYP_KEYS})
            return
        choice = choose_optimizer(o.optimizer, o.hyp, len(self.train_set), self.batch_size, o.epochs, self.nc,
                                  NOMINAL_BATCH)
        choice.apply_to(o.hyp)
        o.optimizer = choice.name
        if self.is_main:
            LOGGER.info(f"optimizer: {choice.name}(lr0={choice.lr0:g}, momentum={choice.momentum:g}, "
                        f"warmup_bias_lr={choice.warmup_bias_lr:g}): {choice.reason}")

    def mosaic_closed(self, epoch: int) -> bool:
        """True from the epoch on where mosaic stops: the last `close_mosaic` epochs train on single,
        letterboxed images (as validation sees them). Decided from the epoch alone, so resumes agree."""
        return epoch >= self.options.epochs - int(self.options.hyp.get("close_mosaic", 0))

    def _update_mosaic(self, epoch: int) -> None:
        dataset = self.train_set
        wanted = dataset.augment and not dataset.rect and not self.mosaic_closed(epoch)
        if dataset.mosaic and not wanted and self.is_main:
            LOGGER.info(f"closing mosaic: epochs {epoch}-{self.options.epochs - 1} train without it "
                        f"(close_mosaic: {self.options.hyp.get('close_mosaic', 0)})")
        dataset.mosaic = wanted

    def build_model(self, resume: dict | None) -> DetectionModel:
        """The model: from the checkpoint to resume, from --weights (our checkpoint, tensors transferred) or
        from --cfg; then --backbone-weights, the hyp's `drop_path` and --freeze.

        --backbone-weights (an official release or a timm state_dict for the backbone node) and --weights
        (our checkpoint, which already holds a backbone) are refused together: the checkpoint's backbone
        would silently replace the file's or the other way round. A resumed run takes every tensor from
        its checkpoint (the backbone file's path is not even saved there). The YAML's own `weights:` is
        loaded when the model is built; --backbone-weights then overwrites it.
        """
        o = self.options
        if o.backbone_weights and o.weights and resume is None:
            raise ValueError(f"--backbone-weights {o.backbone_weights} and --weights {o.weights} both give "
                             "the backbone its tensors: fine-tune our checkpoint with --weights alone, or "
                             "start a model from --cfg with --backbone-weights")
        drop_path = o.hyp.get("drop_path")
        if resume is not None:
            check_backbone_available(resume, o.resume_path)  # a plugin's backbone: name the missing file
            model = DetectionModel(resume["yaml"], nc=self.nc)  # its weights come in load_state_dict()
        elif o.weights:
            ckpt = load_checkpoint(o.weights)
            check_backbone_available(ckpt, o.weights)
            cfg = o.cfg or ckpt["yaml"]
            model = DetectionModel(cfg if drop_path is None else model_config_with_drop_path(cfg, drop_path),
                                   nc=self.nc)
            exclude = ("anchors",) if o.cfg or o.hyp.get("anchors") else ()
            done, total = transfer_weights(model, ckpt, exclude)
            LOGGER.info(f"Transferred {done}/{total} items from {o.weights}")
        else:
            cfg = o.cfg if drop_path is None else model_config_with_drop_path(o.cfg, drop_path)
            model = DetectionModel(cfg, nc=self.nc)
            if o.backbone_weights:
                load_backbone_weights(model, o.backbone_weights, partial=o.backbone_weights_partial)
        if o.freeze:
            self.frozen = freeze_layers(model, o.freeze)
        return model

    def _update_frozen(self, epoch: int) -> None:
        """--freeze-epochs K: the frozen layers train again from epoch K on. Decided from the epoch alone,
        so a resumed run is in the right state; the parameters never left their optimiser groups, so
        nothing is rebuilt (under DDP the wrapper is rebuilt, as it only syncs what required grad)."""
        k = self.options.freeze_epochs
        frozen = set(self.frozen)
        if not (frozen and k > 0 and epoch >= k) or all(
                p.requires_grad for n, p in self.model.named_parameters() if n in frozen):
            return
        set_requires_grad(self.model, self.frozen, True)
        LOGGER.info(f"Epoch {epoch}: unfreezing {len(self.frozen)} parameter tensors (--freeze-epochs {k})")
        if self.rank != -1:
            self.net = self._wrap_ddp(self.model)
            self.compiled_net = self._compile(self.net)

    def _check_anchors(self) -> None:
        from utils.autoanchor import check_anchors

        o = self.options
        check_anchors(self.train_set, self.model, thr=o.hyp["anchor_t"], imgsz=o.imgsz, seed=o.seed)
        if self.ema is not None:
            self.ema.ema.model[-1].anchors.copy_(self.model.model[-1].anchors)

    def _attach_hyp(self) -> None:
        """Attach the loss gains scaled to this model and image size (YOLOv5) and the names to the model."""
        o = self.options
        loss_hyp = scale_loss_gains(o.hyp, self.model.model[-1].nl, self.nc, o.imgsz)
        loss_hyp["label_smoothing"] = o.label_smoothing
        self.model.hyp, self.model.names, self.model.nc = loss_hyp, self.names, self.nc

    def build_dataloaders(self) -> tuple[Any, Any, Any]:
        """(train loader, train dataset, val loader or None): each process loads its share of the total
        --batch-size; only the main process validates (at twice the per-process batch, as YOLOv5)."""
        from data.loaders import create_dataloader

        o = self.options
        per_rank = self.batch_size // self.world_size
        self._check_sampling_options(per_rank)
        common = dict(single_cls=o.single_cls, hyp=o.hyp, cache=o.cache or False, names=self.data["names"],
                      names_source=self.data.get("yaml_file"))
        train_loader, train_set = create_dataloader(
            self.data["train"], o.imgsz, per_rank, self.grid_size, augment=True, rect=o.rect,
            rank=self.rank, workers=o.workers, prefix="train: ", shuffle=True, seed=o.seed,
            image_weights=o.image_weights, quad=o.quad, **common)
        labels = [lb for lb in train_set.labels if len(lb)]
        if labels and (max_cls := int(np.concatenate(labels, 0)[:, 0].max())) >= self.nc:
            raise ValueError(f"label class {max_cls} exceeds nc={self.nc} in {o.data}; allowed 0..{self.nc - 1}")
        val_loader = None
        if self.is_main and self.data.get("val"):
            val_loader, _ = create_dataloader(
                self.data["val"], o.imgsz, per_rank * 2, self.grid_size, rect=True, rank=-1, workers=o.workers * 2,
                pad=0.5, prefix="val: ", **common)
        return train_loader, train_set, val_loader

    def _check_sampling_options(self, per_rank: int) -> None:
        o = self.options
        if o.quad and per_rank % 4:
            raise ValueError(f"--quad merges every 4 images of a batch into one: --batch-size {o.batch_size} "
                             f"gives {per_rank} per process, not a multiple of 4")
        if o.image_weights and (self.rank != -1 or o.rect):
            why = "DDP (each process would draw its own images)" if self.rank != -1 else "--rect (fixed batches)"
            raise ValueError(f"--image-weights draws a weighted random set of images each epoch; it cannot be "
                             f"combined with {why}")

    def _reweight_images(self) -> None:
        """--image-weights: this epoch's images drawn with replacement, each weighted by its labels'
        class weights (rare classes and classes with a low last mAP50-95 count more; YOLOv5's rule). The
        draw is a function of (seed, epoch, last maps), so a resumed run repeats it."""
        labels = self.train_set.labels
        maps = self.maps if len(self.maps) == self.nc else np.zeros(self.nc)
        class_weights = labels_to_class_weights(labels, self.nc) * (1 - maps) ** 2
        weights = labels_to_image_weights(labels, self.nc, class_weights)
        if not weights.sum():  # only background images: nothing to weigh, draw uniformly
            weights = np.ones(len(labels))
        rng = np.random.default_rng([self.options.seed, self.epoch])
        self.train_set.indices = rng.choice(len(labels), size=len(labels), p=weights / weights.sum())

    def _wrap_ddp(self, model: DetectionModel) -> torch.nn.Module:
        if self.rank == -1:
            return model
        if self.options.sync_bn and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            LOGGER.info("Using SyncBatchNorm()")
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Progress and optimiser state after the current epoch (the tensors of the model and EMA are
        added by `checkpoint()`); plain tensors and primitives only."""
        state = {
            "epoch": self.epoch, "best_fitness": self.best_fitness,
            "updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(), "last_opt_step": self.last_opt_step,
            "accumulate": self.accumulate, "maps": [float(m) for m in self.maps],
            "early_stopping": self.stopper.state_dict(),
        }
        for callback in self.callbacks:
            if callback.state_key:
                state[callback.state_key] = callback.state_dict()
        return state

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Resume from a checkpoint: weights, optimiser, scheduler, scaler, EMA, callbacks' state, counters
        and RNG states exactly as saved."""
        de_parallel(self.model).load_state_dict(ckpt["model"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):  # empty when the scaler was disabled (CPU)
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict({"model": ckpt["ema"], "updates": ckpt["updates"]})
        if ckpt.get("early_stopping") is not None:
            self.stopper.load_state_dict(ckpt["early_stopping"])
        for callback in self.callbacks:
            if callback.state_key and ckpt.get(callback.state_key) is not None:
                callback.load_state_dict(ckpt[callback.state_key])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best_fitness = float(ckpt["best_fitness"])
        self.last_opt_step = int(ckpt.get("last_opt_step", -1))
        self.accumulate = int(ckpt.get("accumulate", self.accumulate))
        self.maps = np.array(ckpt.get("maps") or [], dtype=float)
        if ckpt.get("rng") is not None:
            set_rng_state(ckpt["rng"])
        if self.start_epoch >= self.options.epochs:
            raise ValueError(f"{self.options.resume_path} already finished {self.start_epoch} of "
                             f"{self.options.epochs} epochs; nothing to resume")
        LOGGER.info(f"Resuming training from {self.options.resume_path} at epoch {self.start_epoch}")

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint of this epoch: model, EMA, `state_dict()`, the options and hyperparameters."""
        opt = self.options.as_plain_dict()
        opt.pop("backbone_weights", None)  # like the YAML's `weights:`: the tensors are in the checkpoint
        return checkpoint_dict(de_parallel(self.model), self.ema.ema, **self.state_dict(),
                               opt=opt, hyp=dict(self.options.hyp))

    # -- loop --------------------------------------------------------------------------------------------
    def run(self) -> ValResults | None:
        self.options.hyp = check_hyp(self.options.hyp, "TrainOptions.hyp")  # before anything is created
        created = self._prepare_run_folder()
        try:
            self.setup()
        except BaseException:
            if created:
                self._discard_run_folder()
            raise
        self._emit("before_train")
        for epoch in range(self.start_epoch, self.options.epochs):
            self.epoch = epoch
            self._update_frozen(epoch)
            self._update_mosaic(epoch)
            self._emit("before_epoch")
            self._train_epoch()
            self.lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.scheduler.step()
            if self.is_main:
                self._validate_epoch()
                self._update_early_stopping()
            self._emit("after_epoch")
            if self._broadcast_stop(self.stop_requested):
                break
        if self.is_main:
            self._validate_best()
        self._emit("after_train")
        if self.is_main:
            LOGGER.info(f"Results saved to {self.save_dir}")
        return self.val_results

    def _prepare_run_folder(self) -> bool:
        """Create the run folder (main process) with opt.yaml and hyp.yaml for a fresh run; True when this
        call created it."""
        if not self.is_main:
            return False
        created = not self.save_dir.exists()
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        if not self.options.resume:
            save_run_config(self.save_dir, self.options)
        return created

    def _discard_run_folder(self) -> None:
        """A run that fails before training starts leaves no folder behind (it holds nothing but the
        options it was started with), so failed attempts do not pile up as exp2, exp3, ..."""
        LOGGER.info(f"removing {self.save_dir}: the run failed before its first epoch")
        shutil.rmtree(self.save_dir, ignore_errors=True)

    def _emit(self, point: str) -> None:
        for callback in self.callbacks:
            getattr(callback, point)(self)

    def _train_epoch(self) -> None:
        self.net.train()
        if self.options.image_weights:
            self._reweight_images()
        for part in (self.train_loader.sampler, self.train_set):  # seeds of the shuffle and augmentation
            if hasattr(part, "set_epoch"):
                part.set_epoch(self.epoch)
        self.mean_losses = torch.zeros(3, device=self.device)
        self.optimizer.zero_grad()
        for i, (imgs, targets, paths, _) in enumerate(self.train_loader):
            self.step = i + self.batches_per_epoch * self.epoch
            self.batch = (imgs.to(self.device, non_blocking=True).float() / 255, targets, paths)
            self._emit("before_step")
            self.loss_items = self._train_step(i)
            self.mean_losses = (self.mean_losses * i + self.loss_items) / (i + 1)
            self._emit("after_step")

    def _train_step(self, i: int) -> torch.Tensor:
        """Forward, backward and (every `accumulate` steps) an optimizer step; returns the loss items."""
        imgs, targets, paths = self.batch
        if self.step <= self.warmup_iterations:
            self.accumulate = warmup_step(self.optimizer, self.step, self.warmup_iterations, self.epoch,
                                          self.lr_lambda, self.options.hyp, NOMINAL_BATCH, self.batch_size)
        if self.options.multi_scale:
            imgs = self._random_rescale(imgs)
            self.batch = (imgs, targets, paths)
        if self.options.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            loss, loss_items = self.compute_loss(self._forward(imgs), targets.to(self.device))
            if self.options.quad:
                loss = loss * 4  # YOLOv5: a quad image stands for four
            if self.rank != -1:
                loss = loss * self.world_size  # DDP averages gradients across ranks
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch} batch {i} "
                                     f"(images {', '.join(Path(p).name for p in paths[:4])}...); stopping. Try a "
                                     f"lower --hyp lr0, or check these labels")
        self.scaler.scale(loss).backward()
        if self.step - self.last_opt_step >= self.accumulate:
            self._optimizer_step()
            self.last_opt_step = self.step
        return loss_items.detach()

    def _compile(self, net: torch.nn.Module) -> torch.nn.Module | None:
        """--compile: torch.compile(net) (compiled lazily, on the first batch of each new shape).

        Static shapes: a fixed image size sees two batch shapes (full, and the epoch's last partial
        batch), each compiled once. torch's default recompiles the second one with symbolic shapes and
        then runs that generic graph for every batch. --multi-scale sees many shapes, so it keeps
        symbolic shapes."""
        if not self.options.compile:
            return None
        if self.is_main:
            LOGGER.info("--compile: the first batches are slow while torch.compile builds the kernels")
        return torch.compile(net, dynamic=None if self.options.multi_scale else False)

    def _forward(self, imgs: torch.Tensor):
        """The training forward: compiled with --compile, eager otherwise or once compiling has failed."""
        if self.compiled_net is not None:
            try:
                return self.compiled_net(imgs)
            except Exception as err:  # no compiler, an unsupported op, ...: training still works eagerly
                LOGGER.warning(f"--compile: torch.compile failed ({type(err).__name__}: {str(err)[:300]}); "
                               "training continues without it")
                self.compiled_net = None
        return self.net(imgs)

    def _random_rescale(self, imgs: torch.Tensor) -> torch.Tensor:
        """--multi-scale: a random size in [0.5, 1.5] x imgsz, a multiple of the max stride."""
        gs, imgsz = self.grid_size, self.options.imgsz
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

    def is_final_epoch(self) -> bool:
        """The last epoch, or one that early stopping may end training after (both are validated)."""
        return self.epoch + 1 == self.options.epochs or self.stopper.possible_stop

    def _validate_epoch(self) -> None:
        """Validate the EMA model (every epoch, or only the final one with --noval); sets the fitness."""
        self.ema.update_attr(self.model, include=("yaml", "nc", "hyp", "names", "stride"))
        self.val_results = None
        if (not self.options.noval or self.is_final_epoch()) and self.val_loader is not None:
            options = ValOptions(half=self.val_half, single_cls=self.options.single_cls,
                                 save_dir=self.save_dir, plots=False, training=True)
            self.val_results = Validator(self.val_loader, self.names, options, self.compute_loss)(self.ema.ema)
            self.maps = np.asarray(self.val_results.maps, dtype=float)
        self.metrics = (self.val_results if self.val_results is not None else ValResults()).as_row()
        self.fitness = float(fitness(np.array(self.metrics[:4]).reshape(1, -1))[0])
        self.best_fitness = max(self.best_fitness, self.fitness)

    def _update_early_stopping(self) -> None:
        """The trainer's own stop rule (--patience), decided before the after_epoch callbacks run, so each
        of them (the checkpoint's state included) sees this epoch's decision whatever its place."""
        if self.stopper.update(self.epoch, self.fitness):
            LOGGER.info(f"Stopping training early as no improvement observed in last {self.stopper.patience} "
                        f"epochs. Best results observed at epoch {self.stopper.best_epoch}.")
            self.stop_requested = True

    def _broadcast_stop(self, stop: bool) -> bool:
        if self.rank == -1:
            return stop
        flag = [stop]
        dist.broadcast_object_list(flag, 0)
        return bool(flag[0])

    def _validate_best(self) -> None:
        """Validate best.pt once more, fused and with plots, as YOLOv5 does."""
        best = self.weights_dir / "best.pt"
        if not best.exists() or self.val_loader is None:
            return
        LOGGER.info(f"\nValidating {best}...")
        model = load_detection_model(best, self.device, fuse=True)
        options = ValOptions(half=self.val_half, single_cls=self.options.single_cls, save_dir=self.save_dir,
                             plots=not self.options.noplots, verbose=True)
        self.final_results = Validator(self.val_loader, self.names, options)(model)


def to_channels_last(model: torch.nn.Module, device: torch.device) -> None:
    """--channels-last: the model's weights in NHWC memory format. Refused on the CPU for a model with a
    strided 1x1 convolution: its channels-last backward in torch's CPU kernels corrupts the heap ('double
    free or corruption', then a crash; FastViT's MobileOne stride-2 blocks, ResNet-style shortcuts)."""
    strided = strided_pointwise_convs(model) if device.type == "cpu" else []
    if strided:
        more = f" and {len(strided) - 1} more" if len(strided) > 1 else ""
        raise ValueError(f"--channels-last on the CPU: layer {strided[0]}{more} is a 1x1 convolution with a "
                         f"stride, whose channels-last backward crashes torch {torch.__version__}'s CPU "
                         "kernels; train without --channels-last (it gains 1.0-1.13x on CPUs: "
                         "docs/training-engine.md)")
    model.to(memory_format=torch.channels_last)


def save_run_config(save_dir: Path, options: TrainOptions) -> None:
    """hyp.yaml and opt.yaml in the run folder, as YOLOv5 writes them."""
    yaml_save(save_dir / "hyp.yaml", dict(options.hyp))
    yaml_save(save_dir / "opt.yaml", options.as_plain_dict())
