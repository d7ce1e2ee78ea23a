"""Train a detector (YOLOv5's train.py).

    python train.py --cfg yolov5n.yaml --epochs 3 --imgsz 320          # built-in dataset, from scratch
    python train.py --cfg yolov5-riformer.yaml --data bccd.yaml --epochs 100
    python train.py --resume                                            # latest runs/train/*/weights/last.pt
    torchrun --nproc_per_node 2 train.py --cfg yolov5n.yaml --device cpu   # DDP (gloo on CPU, NCCL on GPUs)
"""

from __future__ import annotations

import argparse
import logging
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.checkpoint import load_checkpoint
from engine.evolve import evolve
from engine.trainer import Trainer, TrainOptions, distributed_env
from models.backbones.plugins import load_plugins
from utils.general import increment_path, resolve_config, yaml_load
from utils.hyp import check_hyp
from utils.torch_utils import select_device

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="", help="our checkpoint to fine-tune from ('' = from scratch)")
    p.add_argument("--backbone-weights", default="",
                   help="official release or timm state_dict for the backbone of --cfg (not with --weights)")
    p.add_argument("--backbone-weights-partial", action="store_true",
                   help="accept a --backbone-weights file that leaves backbone tensors without a value")
    p.add_argument("--cfg", default="", help="model YAML (bare names resolve in configs/models/)")
    p.add_argument("--plugin", nargs="+", default=[], metavar="FILE",
                   help="Python file(s) that register backbones (docs/bring-a-backbone.md)")
    p.add_argument("--data", default="builtin.yaml", help="dataset YAML (default: the built-in dataset)")
    p.add_argument("--hyp", default="hyp.scratch-low.yaml", help="hyperparameter YAML")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16, help="total batch size for all devices")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (pixels)")
    p.add_argument("--rect", action="store_true", help="rectangular training")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume the latest or the given last.pt")
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate the final epoch")
    p.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    p.add_argument("--noplots", action="store_true", help="save no plot files")
    p.add_argument("--cache", nargs="?", const="ram", default=None, choices=["ram", "disk"],
                   help="cache images in ram (default) or on disk")
    p.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    p.add_argument("--image-weights", action="store_true",
                   help="draw each epoch's images weighted by their classes' rarity and last mAP (single process)")
    p.add_argument("--quad", action="store_true",
                   help="quad dataloader: 4 images of a batch become one at 2x size (batch a multiple of 4)")
    p.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    p.add_argument("--optimizer", default="auto", choices=["auto", "SGD", "Adam", "AdamW"],
                   help="auto: AdamW (lr from the class count) for short schedules, SGD (hyp lr0) for long")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    p.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    p.add_argument("--freeze", nargs="+", default=[], help="freeze first N layers, layers a b c, or 'backbone'")
    p.add_argument("--freeze-epochs", type=int, default=0,
                   help="train the --freeze layers again from this epoch on (0 = frozen throughout)")
    p.add_argument("--save-period", type=int, default=-1, help="save a checkpoint every x epochs (disabled if < 1)")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact reruns on CPU)")
    p.add_argument("--amp", action="store_true", help="CPU: bf16 autocast (native bf16 only)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and images in channels-last memory format (measure: benchmarks --train-speed)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (slow start; falls back to eager if it fails)")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers (per rank)")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    p.add_argument("--project", default="runs/train", help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--evolve", type=int, nargs="?", const=300, default=0,
                   help="evolve hyperparameters for x generations (default 300), into runs/evolve/exp")
    p.add_argument("--resume-evolve", default="",
                   help="continue the evolution in this folder (or of this evolve.csv) for --evolve more generations")
    return p


def check_opt(parser: argparse.ArgumentParser, opt: argparse.Namespace) -> argparse.Namespace:
    """Refuse contradictory or out-of-range options with a message naming them."""
    if opt.resume_evolve and not opt.evolve:
        parser.error("--resume-evolve continues an evolution: say how many more generations with --evolve N")
    if opt.evolve and opt.resume:
        parser.error("--evolve starts fresh runs; --resume cannot be combined with it (use --resume-evolve)")
    if opt.evolve < 0:
        parser.error(f"--evolve must be >= 1 generation, got {opt.evolve}")
    if not opt.resume and not opt.cfg and not opt.weights:
        parser.error("give --cfg (a model YAML) or --weights (a checkpoint to fine-tune), or --resume")
    for flag, value, low in (("--epochs", opt.epochs, 1), ("--batch-size", opt.batch_size, 1),
                             ("--imgsz", opt.imgsz, 32), ("--workers", opt.workers, 0), ("--patience", opt.patience, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if not 0 <= opt.label_smoothing < 1:
        parser.error(f"--label-smoothing must be in [0, 1), got {opt.label_smoothing}")
    if opt.backbone_weights and opt.weights:
        parser.error("--backbone-weights loads a release file into a --cfg model; --weights already gives "
                     "the backbone its tensors. Use one of them")
    if opt.backbone_weights_partial and not opt.backbone_weights:
        parser.error("--backbone-weights-partial needs --backbone-weights FILE")
    if opt.freeze_epochs < 0 or (opt.freeze_epochs and not opt.freeze):
        parser.error(f"--freeze-epochs {opt.freeze_epochs}: give a number of epochs >= 1, with --freeze")
    if opt.freeze and opt.freeze != ["backbone"] and not all(str(x).isdigit() for x in opt.freeze):
        parser.error(f"--freeze takes a layer count, layer indices or 'backbone'; got {' '.join(opt.freeze)}")
    if opt.rect and opt.multi_scale:
        parser.error("--rect and --multi-scale contradict each other (rectangular batches have fixed shapes)")
    if opt.sync_bn and distributed_env()[1] == -1:
        parser.error("--sync-bn only applies to DDP training (torchrun --nproc_per_node N train.py ...)")
    world = distributed_env()[2]
    if opt.batch_size % world:
        parser.error(f"--batch-size {opt.batch_size} must be a multiple of the number of processes ({world})")
    return opt


def latest_checkpoint(search_dir: str = "runs") -> Path:
    files = sorted(Path(search_dir).rglob("last.pt"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"--resume: no last.pt found under {search_dir}/; pass the path to one")
    return files[-1]


def resume_options(opt: argparse.Namespace) -> TrainOptions:
    """The saved options of the run to resume (with its hyperparameters), with this invocation's
    path and device."""
    path = Path(opt.resume) if isinstance(opt.resume, str) else latest_checkpoint()
    ckpt = load_checkpoint(path)
    saved = TrainOptions.from_dict(ckpt["opt"])
    saved.hyp = check_hyp(dict(ckpt["hyp"]), f"checkpoint {path}")
    saved.resume, saved.resume_path, saved.device = True, str(path), opt.device or saved.device
    saved.exist_ok = True
    saved.save_dir = str(path.parent.parent)
    return saved


def new_run_options(opt: argparse.Namespace, rank: int) -> TrainOptions:
    """Options of a fresh run: config paths resolved, hyperparameters read, the run folder chosen."""
    options = TrainOptions.from_dict(vars(opt))
    options.cfg = str(resolve_config(opt.cfg, "models")) if opt.cfg else ""
    hyp_file = resolve_config(opt.hyp, "hyps")
    options.hyp = check_hyp(yaml_load(hyp_file), str(hyp_file))  # every problem at once, before any folder
    save_dir = Path(opt.project) / opt.name
    if rank in (-1, 0):
        save_dir = increment_path(save_dir, exist_ok=opt.exist_ok)
    options.save_dir = str(save_dir)
    return options


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    opt = parser.parse_args(argv)
    load_plugins(vars(opt).pop("plugin"))  # before any model YAML is read
    opt = check_opt(parser, opt)
    local_rank, rank, world = distributed_env()
    if opt.evolve and opt.project == "runs/train":
        opt.project = "runs/evolve"  # YOLOv5's folder for evolutions
    options = resume_options(opt) if opt.resume else new_run_options(opt, rank)
    if opt.resume_evolve:
        options.save_dir = str(_evolve_folder(opt.resume_evolve))
    device = _setup_device(options.device, local_rank)
    if world > 1:
        options.save_dir = _shared_save_dir(options.save_dir)
    if opt.evolve:
        evolve(options, device, opt.evolve, Path(options.save_dir))
    else:
        Trainer(options, device).run()
    if world > 1:
        dist.destroy_process_group()
    return 0


def _evolve_folder(path: str) -> Path:
    """The folder of an evolution to continue: the given folder or the one holding the given evolve.csv."""
    folder = Path(path)
    folder = folder.parent if folder.name == "evolve.csv" else folder
    if not (folder / "evolve.csv").is_file():
        raise FileNotFoundError(f"--resume-evolve {path}: no evolve.csv there to continue")
    return folder


def _setup_device(device: str, local_rank: int) -> torch.device:
    device = select_device(device)
    if local_rank == -1:
        return device
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(hours=3))
    return device


def _shared_save_dir(save_dir: str) -> str:
    """Rank 0 chose the run folder; every rank uses that one."""
    box = [save_dir]
    dist.broadcast_object_list(box, 0)
    return box[0]


if __name__ == "__main__":
    from engine.cli import run_cli

    run_cli(main)  # user errors: one message, exit 1 (--verbose: traceback)
