"""Validate a trained detector on a dataset split (YOLOv5's val.py).

    python val.py --weights runs/train/exp/weights/best.pt --data bccd.yaml --img 640 --save-json
    python val.py --weights best.onnx --data bccd.yaml --task speed
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine.cli import traceback_requested
from engine.evaluation import TASKS, EvalOptions, evaluate, study
from engine.validator import ValResults
from models.backbones.plugins import load_plugins
from utils.allocator import keep_freed_memory
from utils.general import yaml_save

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="builtin.yaml",
                   help="dataset YAML (bare names resolve in configs/data/)")
    p.add_argument("--plugin", nargs="+", default=[], metavar="FILE",
                   help="Python file(s) that register backbones (docs/bring-a-backbone.md)")
    p.add_argument("--weights", nargs="+", default=["best.pt"],
                   help="checkpoint .pt, .torchscript, .onnx (also _int8.onnx) or an _openvino_model folder; "
                        "several .pt run as one ensemble")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    p.add_argument("--conf-thres", type=float, default=0.001)
    p.add_argument("--iou-thres", type=float, default=0.6)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--task", default="val", choices=TASKS)
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1 or cpu")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    p.add_argument("--augment", action="store_true", help="test-time augmentation (flips and scales)")
    p.add_argument("--verbose", action="store_true", help="report mAP by class")
    p.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-json", action="store_true", help="save a COCO JSON and evaluate with pycocotools")
    p.add_argument("--project", default="runs/val")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--half", action="store_true", help="FP16 half-precision inference (CUDA only)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast of a .pt checkpoint; on the CPU only with native bf16 (AVX-512 BF16 / "
                        "AMX), unless VITDET_EMULATED_BF16=1 (emulated, to measure accuracy)")
    opt = p.parse_args(argv)
    _check_opt(p, opt)
    return opt


def _check_opt(parser: argparse.ArgumentParser, opt: argparse.Namespace) -> None:
    if opt.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {opt.batch_size}")
    if opt.imgsz < 32:
        parser.error(f"--imgsz must be >= 32, got {opt.imgsz}")
    for flag in ("conf_thres", "iou_thres"):
        if not 0 <= getattr(opt, flag) <= 1:
            parser.error(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(opt, flag)}")
    if opt.save_conf and not opt.save_txt:
        parser.error("--save-conf only applies with --save-txt")


def run(**options) -> tuple[ValResults, Path]:
    """Validate one weights file (keyword arguments of engine.evaluation.EvalOptions); returns
    (results, save_dir)."""
    return evaluate(EvalOptions(**options))


def main(argv: list[str] | None = None) -> int:
    """val.py: 0 on success; 1 with one error line (no traceback) for a refused option (--half or a
    --device this machine lacks), a missing file or a dataset/model mismatch, as detect.py does."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = parse_opt(argv)
    load_plugins(vars(opt).pop("plugin"))
    keep_freed_memory()  # steady eager inference speed (utils/allocator.py)
    try:
        _validate_all(opt)
    except (FileNotFoundError, ValueError) as err:
        if traceback_requested():  # --verbose / VITDET_TRACEBACK=1 (engine/cli.py)
            raise
        LOGGER.error(f"val.py: {err}")
        return 1
    return 0


def _validate_all(opt: argparse.Namespace) -> None:
    if opt.task == "study":
        study(EvalOptions(**vars(opt)))
        return
    weights = opt.weights[0] if len(opt.weights) == 1 else opt.weights  # several .pt: one ensemble (YOLOv5)
    results, save_dir = run(**{**vars(opt), "weights": weights})
    shown = str(weights) if len(opt.weights) == 1 else [str(w) for w in weights]
    yaml_save(save_dir / "metrics.yaml", {"weights": shown, "P": float(results.mp), "R": float(results.mr),
                                          "mAP50": float(results.map50), "mAP50-95": float(results.map),
                                          "speed_ms": [float(t) for t in results.speed]})


if __name__ == "__main__":
    from engine.cli import run_cli

    run_cli(main)  # user errors: one message, exit 1 (--verbose: traceback)
