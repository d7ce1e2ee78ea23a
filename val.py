"""Validate a trained detector on a dataset split (YOLOv5's val.py).

    python val.py --weights runs/train/exp/weights/best.pt --data bccd.yaml --img 640 --save-json
    python val.py --weights best.onnx --data bccd.yaml --task speed
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from utils.general import increment_path, yaml_save
from utils.torch_utils import select_device
from utils.validator import ValResults, run_validation

LOGGER = logging.getLogger("vitdet")
TASKS = ("val", "train", "test", "speed", "study")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="builtin.yaml", help="dataset YAML (bare names resolve in configs/data/)")
    p.add_argument("--weights", nargs="+", default=["best.pt"], help="checkpoint .pt, .torchscript or .onnx")
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


def _coco_ids(cfg: dict):
    """Image-id function for the prediction JSON (same rule as the ground-truth converter)."""
    from data.convert import coco_image_id
    from utils.coco_eval import coco80_to_coco91_class

    def ids(path):
        return coco_image_id(path)

    ids.class_map = coco80_to_coco91_class() if _is_coco(cfg) else None
    return ids


def _is_coco(cfg: dict) -> bool:
    return Path(str(cfg.get("yaml_file") or "")).name == "coco.yaml" and cfg["nc"] == 80


def _evaluate_with_pycocotools(cfg: dict, split: str, results: ValResults, save_dir: Path) -> dict | None:
    """Evaluate the saved predictions with pycocotools against the dataset's COCO ground truth."""
    from data.convert import yolo_to_coco
    from utils.coco_eval import evaluate_coco

    gt = cfg.get("annotations") or yolo_to_coco(cfg, split, save_dir / f"{split}_ground_truth.json")
    image_ids = sorted({row["id"] for row in json.loads(Path(gt).read_text())["images"]})
    coco = evaluate_coco(gt, results.json_path, image_ids=image_ids)
    LOGGER.info(f"pycocotools evaluation of {results.json_path}:\n{coco['summary']}")
    LOGGER.info(f"mAP50-95: ours {results.map:.4f}, pycocotools {coco['map50_95']:.4f}; "
                f"mAP50: ours {results.map50:.4f}, pycocotools {coco['map50']:.4f}")
    return coco


def run(data="builtin.yaml", weights="best.pt", batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.6,
        max_det=300, task="val", device="", workers=8, single_cls=False, augment=False, verbose=False,
        save_txt=False, save_conf=False, save_json=False, project="runs/val", name="exp", exist_ok=False,
        half=False, plots=True) -> tuple[ValResults, Path]:
    """Validate one weights file; returns (results, save_dir)."""
    from data.config import check_dataset
    from data.loaders import create_dataloader
    from models.backend import InferenceBackend

    device = select_device(device)
    if half and device.type != "cuda":
        raise ValueError("--half needs a CUDA device (half precision is not supported for CPU inference)")
    cfg = check_dataset(data)
    names = ["item"] if single_cls else cfg["names"]
    backend = InferenceBackend(weights, device=device, fp16=half)
    _check_classes(backend, cfg, weights, single_cls)
    imgsz, batch_size, rect = _shapes_for(backend, imgsz, batch_size)
    split = task if task in ("train", "val", "test") else "val"
    if not cfg.get(split):
        raise ValueError(f"dataset {cfg.get('yaml_file')} has no '{split}' split")
    speed = task == "speed"
    loader, _ = create_dataloader(cfg[split], imgsz, batch_size, backend.stride, single_cls,
                                  pad=0.0 if speed else 0.5, rect=rect and not speed, workers=workers,
                                  prefix=f"{split}: ", names=cfg["names"])
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    backend.warmup(imgsz=(1 if backend.kind == "pytorch" else batch_size, 3, imgsz, imgsz))
    results = run_validation(
        backend, loader, names, conf_thres=0.25 if speed else conf_thres, iou_thres=0.45 if speed else iou_thres,
        max_det=max_det, half=half, augment=augment, single_cls=single_cls, save_dir=save_dir,
        plots=plots and not speed, save_txt=save_txt, save_conf=save_conf, save_json=save_json,
        verbose=verbose, coco_ids=_coco_ids(cfg) if save_json else None,
    )
    if save_json and results.json_path is not None:
        results.coco = _evaluate_with_pycocotools(cfg, split, results, save_dir)
    LOGGER.info(f"Results saved to {save_dir}")
    return results, save_dir


def _check_classes(backend, cfg: dict, weights, single_cls: bool) -> None:
    nc_model = len(backend.names)
    if not single_cls and nc_model != cfg["nc"]:
        raise ValueError(f"{weights} predicts {nc_model} classes but dataset {cfg.get('yaml_file')} has "
                         f"{cfg['nc']}; pass the dataset it was trained on (or --single-cls)")


def _shapes_for(backend, imgsz: int, batch_size: int) -> tuple[int, int, bool]:
    """(imgsz, batch size, rect) that the backend can run: static exports fix both and need squares."""
    stride = int(backend.stride)
    if imgsz % stride:
        new = max(stride, round(imgsz / stride) * stride)
        LOGGER.warning(f"--imgsz {imgsz} must be a multiple of the max stride {stride}, updating to {new}")
        imgsz = new
    if backend.fixed_shape is not None:
        b, h, w = backend.fixed_shape
        if (h, w) != (imgsz, imgsz) or b != batch_size:
            LOGGER.info(f"{backend.kind} model has a fixed input of {b}x3x{h}x{w}: validating at that shape")
        if h != w:
            raise ValueError(f"static export with a non-square input {h}x{w} cannot validate letterboxed squares")
        return h, b, False
    return imgsz, batch_size, backend.dynamic  # rectangular batches need an input of any shape


def _study(opt: argparse.Namespace) -> None:
    """mAP and speed against image size for each weights file (YOLOv5's --task study)."""
    for w in opt.weights:
        rows = []
        for size in range(256, 1536 + 128, 128):
            LOGGER.info(f"Running {w} --imgsz {size}...")
            r, _ = run(**{**_run_kwargs(opt), "weights": w, "imgsz": size, "task": "val", "plots": False})
            rows.append([size, *r.as_row()[:4], *r.speed])
        out = Path(f"study_{Path(opt.data).stem}_{Path(w).stem}.txt")
        out.write_text("".join(" ".join(f"{v:10.4g}" for v in row) + "\n" for row in rows))
        LOGGER.info(f"Study written to {out} (imgsz, P, R, mAP50, mAP50-95, pre, inference, NMS ms)")


def _run_kwargs(opt: argparse.Namespace) -> dict:
    kwargs = vars(opt).copy()
    kwargs.pop("weights")
    return kwargs


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = parse_opt(argv)
    if opt.task == "study":
        _study(opt)
        return 0
    for w in opt.weights:
        results, save_dir = run(**_run_kwargs(opt), weights=w)
        yaml_save(save_dir / "metrics.yaml", {"weights": str(w), "P": float(results.mp), "R": float(results.mr),
                                               "mAP50": float(results.map50), "mAP50-95": float(results.map),
                                               "speed_ms": [float(t) for t in results.speed]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
