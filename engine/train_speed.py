"""Training images/s of the trainer's own step under each speed option (benchmarks.py --train-speed).

    python benchmarks.py --train-speed --cfg yolov5n.yaml --imgsz 320 --train-batch 16 --steps 20
    python benchmarks.py --train-speed --cfg yolov5s.yaml --imgsz 640 --train-batch 16 --device 0   # GPU

Each variant builds a `Trainer` with its options (--channels-last, --compile, --amp) and times
`Trainer._train_step` -- forward, loss, backward, GradScaler, the optimizer step every `accumulate`
batches and the EMA update, exactly the code a real run executes -- on one fixed synthetic batch
(random images, 4 random boxes each), so data loading is left out. Warm-up steps (where
torch.compile builds its kernels) are not timed; the compile time is reported separately.

Variants: fp32 (the default float32 eager step; on CUDA the trainer always uses float16 AMP, so it is
named amp-fp16 there), channels-last, compile, channels-last+compile, and bf16 / bf16+channels-last
(--amp) on CPUs with native bf16 only (skipped with a reason elsewhere: emulated bf16 is slower).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.precision import cpu_bf16_support
from engine.trainer import Trainer, TrainOptions, to_channels_last
from utils.general import resolve_config, yaml_load
from utils.optim import ModelEMA, lr_lambda

LOGGER = logging.getLogger(f"vitdet.{__name__}")
VARIANTS = {  # name -> TrainOptions overrides
    "fp32": {},
    "channels-last": {"channels_last": True},
    "compile": {"compile": True},
    "channels-last+compile": {"channels_last": True, "compile": True},
    "bf16": {"amp": True},
    "bf16+channels-last": {"amp": True, "channels_last": True},
}
NC = 80  # synthetic classes (COCO's count: the head's size as in a real run)


@dataclass
class SpeedResult:
    variant: str
    images_per_s: float | None  # None: skipped or failed (see note)
    warmup_s: float = 0.0  # the untimed first steps (torch.compile's build time included)
    note: str = ""


def _step_trainer(cfg: str, imgsz: int, batch_size: int, device: torch.device, overrides: dict) -> Trainer:
    """A Trainer set up for `_train_step` without a dataset: model, optimizer, scheduler, EMA, loss, net."""
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    options = TrainOptions(cfg=str(resolve_config(cfg, "models")), hyp=hyp, imgsz=imgsz, batch_size=batch_size,
                           optimizer="SGD", epochs=100, **overrides)
    trainer = Trainer(options, device, defaults=[])
    trainer.nc, trainer.names = NC, [f"class{i}" for i in range(NC)]
    trainer.model = trainer.build_model(None).to(device)
    if options.channels_last:
        to_channels_last(trainer.model, device)
    trainer.optimizer = trainer.build_optimizer()
    trainer.lr_lambda = lr_lambda(options.epochs, hyp["lrf"], options.cos_lr)
    trainer.scheduler = trainer.build_scheduler()
    trainer.ema = ModelEMA(trainer.model)
    trainer._attach_hyp()
    trainer.compute_loss = trainer.build_criterion()
    trainer.net = trainer.model.train()
    trainer.compiled_net = trainer._compile(trainer.net)
    trainer.warmup_iterations = -1  # time the steady state, not the warm-up's lr ramp
    return trainer


def synthetic_batch(batch_size: int, imgsz: int, device: torch.device, seed: int = 0) -> tuple:
    """(images (B, 3, imgsz, imgsz) float in [0, 1], targets (4B, 6) [image, class, x, y, w, h] normalised,
    paths) as the trainer's loop hands them to `_train_step`."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, imgsz, imgsz, generator=g)
    n = 4 * batch_size
    xy, wh = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05
    targets = torch.cat([torch.arange(batch_size).repeat_interleave(4)[:, None].float(),
                         torch.randint(0, NC, (n, 1), generator=g).float(), xy, wh], 1)
    return images.to(device), targets, [f"synthetic{i}.jpg" for i in range(batch_size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_variant(cfg: str, variant: str, imgsz: int, batch_size: int, steps: int, device: torch.device,
                    warmup: int = 3) -> SpeedResult:
    """Training images/s of `variant` over `steps` timed steps after `warmup` untimed ones."""
    overrides = VARIANTS[variant]
    if overrides.get("amp") and device.type != "cpu":
        return SpeedResult(variant, None, note="skipped: CUDA always trains with float16 AMP (the first row)")
    if overrides.get("amp") and not cpu_bf16_support().native:
        return SpeedResult(variant, None, note=f"skipped: no native bf16 ({cpu_bf16_support().detected})")
    try:
        trainer = _step_trainer(cfg, imgsz, batch_size, device, overrides)
    except ValueError as err:
        if not overrides.get("channels_last"):
            raise
        return SpeedResult(variant, None, note=f"refused: {err}")
    trainer.batch = synthetic_batch(batch_size, imgsz, device)
    started = time.perf_counter()
    for i in range(warmup):
        trainer.step = i
        trainer._train_step(i)
    _sync(device)
    warm = time.perf_counter() - started
    note = "compile failed: ran eagerly (see log)" if overrides.get("compile") and trainer.compiled_net is None else ""
    started = time.perf_counter()
    for i in range(warmup, warmup + steps):
        trainer.step = i
        trainer._train_step(i)
    _sync(device)
    return SpeedResult(variant, steps * batch_size / (time.perf_counter() - started), warm, note)


def train_speed_table(cfgs: list[str], variants: list[str], imgsz: int, batch_size: int, steps: int,
                      device: torch.device) -> str:
    """A markdown table of images/s per model and variant, each with its ratio to the first variant."""
    lines = [f"Training images/s ({device}, {imgsz} px, batch {batch_size}, {steps} timed steps; load average "
             f"at start {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} torch threads)", "",
             "| model | variant | images/s | x first | warm-up s | note |", "|---|---|---|---|---|---|"]
    LOGGER.info("\n".join(lines))
    for cfg in cfgs:
        first = None
        for variant in variants:
            r = measure_variant(cfg, variant, imgsz, batch_size, steps, device)
            first = first or r.images_per_s
            ips = f"{r.images_per_s:.2f}" if r.images_per_s else "n/a"
            ratio = f"{r.images_per_s / first:.2f}" if r.images_per_s and first else "n/a"
            lines.append(f"| {Path(cfg).name} | {_label(variant, device)} | {ips} | {ratio} | "
                         f"{r.warmup_s:.1f} | {r.note} |")
            LOGGER.info(lines[-1])  # as measured: a long run (compiling) shows what it has so far
    return "\n".join(lines)


def _label(variant: str, device: torch.device) -> str:
    """On CUDA the trainer always runs float16 AMP: say so instead of 'fp32'."""
    return variant.replace("fp32", "amp-fp16") if device.type == "cuda" else variant


def train_speed_report(cfgs: list[str], args) -> int:
    """benchmarks.py --train-speed: log the table row by row and write it to <out>-train-speed.md."""
    from utils.torch_utils import select_device

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    table = train_speed_table(list(cfgs), args.variants, args.imgsz, args.train_batch,
                              args.steps, select_device(args.device))
    Path(f"{args.out}-train-speed.md").write_text(table + "\n")
    LOGGER.info(f"written to {args.out}-train-speed.md")
    return 0
