"""Validating one weights file on one dataset split: what val.py does behind its flags.

    from engine.evaluation import EvalOptions, evaluate
    results, save_dir = evaluate(EvalOptions(weights="best.pt", data="bccd.yaml", save_json=True))

The weights are any format `engine.backend.InferenceBackend` runs (.pt, .torchscript, .onnx, OpenVINO).
Rectangular batches are used whenever the backend accepts any input shape; a static export runs at
its own fixed shape (square or not: every image letterboxed to exactly that height x width).
`--save-json` also scores the predictions with pycocotools.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.validator import Validator, ValOptions, ValResults
from utils.general import increment_path
from utils.torch_utils import select_device

LOGGER = logging.getLogger(f"vitdet.{__name__}")
TASKS = ("val", "train", "test", "speed", "study")


@dataclass
class EvalOptions:
    """val.py's flags. task 'speed' times batch-1-style inference at conf 0.25 / IoU 0.45 without plots."""

    data: str = "builtin.yaml"
    weights: str | Path = "best.pt"
    batch_size: int = 32
    imgsz: int = 640
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    task: str = "val"
    device: str = ""
    workers: int = 8
    single_cls: bool = False
    augment: bool = False
    verbose: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_json: bool = False
    project: str | Path = "runs/val"
    name: str = "exp"
    exist_ok: bool = False
    half: bool = False
    plots: bool = True
    bf16: bool = False  # bf16 autocast of a .pt checkpoint (engine.backend.InferenceBackend's bf16)
    report_folder: bool = True  # False for callers that validate into a temporary folder they delete

    def val_options(self, save_dir: Path) -> ValOptions:
        speed = self.task == "speed"
        return ValOptions(conf_thres=0.25 if speed else self.conf_thres,
                          iou_thres=0.45 if speed else self.iou_thres,
                          max_det=self.max_det, half=self.half, bf16=self.bf16, augment=self.augment,
                          single_cls=self.single_cls,
                          save_dir=save_dir, plots=self.plots and not speed, save_txt=self.save_txt,
                          save_conf=self.save_conf, save_json=self.save_json, verbose=self.verbose)


def evaluate(opt: EvalOptions, backend=None) -> tuple[ValResults, Path]:
    """Validate `opt.weights` (or an InferenceBackend already loaded: `backend`) on the dataset split
    `opt.task`; returns (results, save_dir)."""
    from data.config import check_dataset
    from engine.backend import InferenceBackend

    device = select_device(opt.device) if backend is None else backend.device
    if opt.half and device.type != "cuda":
        raise ValueError(f"--half needs a CUDA device (half precision is not supported for "
                         f"{device.type.upper()} inference; --device {opt.device!r} gave {device}); "
                         f"drop --half or pick a CUDA device")
    cfg = check_dataset(opt.data)
    names = ["item"] if opt.single_cls else cfg["names"]
    backend = backend or InferenceBackend(opt.weights, device=device, fp16=opt.half, bf16=opt.bf16)
    check_classes(backend, cfg, opt.weights, opt.single_cls)
    imgsz, batch_size, rect = shapes_for(backend, opt.imgsz, opt.batch_size)
    split = opt.task if opt.task in ("train", "val", "test") else "val"
    loader = _loader(cfg, split, imgsz, batch_size, backend.stride, rect, opt, backend.fixed_shape)
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    backend.warmup(imgsz=(1 if backend.kind == "pytorch" else batch_size, 3, imgsz, imgsz))
    coco_ids = coco_id_function(cfg) if opt.save_json else None
    results = Validator(loader, names, opt.val_options(save_dir), coco_ids=coco_ids)(backend)
    if opt.save_json and results.json_path is not None:
        results.coco = evaluate_with_pycocotools(cfg, split, results, save_dir)
    if opt.report_folder:
        LOGGER.info(f"Results saved to {save_dir}")
    return results, save_dir


def _loader(cfg: dict, split: str, imgsz: int, batch_size: int, stride: int, rect: bool, opt: EvalOptions,
            fixed_shape: tuple[int, int, int] | None = None):
    """The split's loader; for a static export whose (h, w) is not square every image is letterboxed to
    exactly that (h, w), as detect.py feeds it (rectangular batches, all of the export's shape)."""
    from data.loaders import create_dataloader

    if not cfg.get(split):
        raise ValueError(f"dataset {cfg.get('yaml_file')} has no '{split}' split")
    speed = opt.task == "speed"
    fixed_rect = fixed_shape is not None and fixed_shape[1] != fixed_shape[2]
    loader, dataset = create_dataloader(cfg[split], imgsz, batch_size, stride, opt.single_cls,
                                        pad=0.0 if speed else 0.5, rect=(rect and not speed) or fixed_rect,
                                        workers=opt.workers, prefix=f"{split}: ", names=cfg["names"],
                                        names_source=cfg.get("yaml_file"))
    if fixed_rect:  # images are resized to a long side of max(h, w), then letterboxed into (h, w)
        dataset.batch_shapes = np.tile(np.array(fixed_shape[1:], dtype=int), (len(dataset.batch_shapes), 1))
    return loader


def check_classes(backend, cfg: dict, weights, single_cls: bool) -> None:
    """A model for another number of classes is refused (unless --single-cls)."""
    nc_model = len(backend.names)
    if not single_cls and nc_model != cfg["nc"]:
        raise ValueError(f"{weights} predicts {nc_model} classes but dataset {cfg.get('yaml_file')} has "
                         f"{cfg['nc']}; pass the dataset it was trained on (or --single-cls)")


def shapes_for(backend, imgsz: int, batch_size: int) -> tuple[int, int, bool]:
    """(imgsz, batch size, rect) that the backend can run. A static export fixes both: imgsz is its
    longer side, and a non-square (h, w) export is validated with every image letterboxed to exactly
    (h, w) (see _loader)."""
    stride = int(backend.stride)
    if imgsz % stride:
        new = max(stride, round(imgsz / stride) * stride)
        LOGGER.warning(f"--imgsz {imgsz} must be a multiple of the max stride {stride}, updating to {new}")
        imgsz = new
    if backend.fixed_shape is not None:
        b, h, w = backend.fixed_shape
        if (h, w) != (imgsz, imgsz) or b != batch_size:
            LOGGER.info(f"{backend.kind} model has a fixed input of {b}x3x{h}x{w}: validating at that shape")
        return max(h, w), b, False
    return imgsz, batch_size, backend.dynamic  # rectangular batches need an input of any shape


def coco_id_function(cfg: dict):
    """Image-id function for the prediction JSON (same rule as the ground-truth converter); its
    `class_map` maps our 80 COCO classes to COCO's 91 ids for coco.yaml."""
    from data.convert import coco_image_id
    from utils.coco_eval import coco80_to_coco91_class

    def ids(path):
        return coco_image_id(path)

    ids.class_map = coco80_to_coco91_class() if _is_coco(cfg) else None
    return ids


def _is_coco(cfg: dict) -> bool:
    return Path(str(cfg.get("yaml_file") or "")).name == "coco.yaml" and cfg["nc"] == 80


def evaluate_with_pycocotools(cfg: dict, split: str, results: ValResults, save_dir: Path) -> dict | None:
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


STUDY_SIZES = tuple(range(256, 1536 + 128, 128))  # YOLOv5's --task study image sizes


def study(opt: EvalOptions, sizes: tuple[int, ...] = STUDY_SIZES) -> Path:
    """mAP and speed against image size for each weights file (YOLOv5's --task study). Everything goes
    into one new run folder (runs/val/exp, exp2, ...): study_<data>_<weights>.txt (imgsz, P, R, mAP50,
    mAP50-95, pre, inference, NMS ms per row), study.png, and one subfolder per evaluation
    (<weights>_<imgsz>/). Returns the folder."""
    from utils.plots import plot_study

    weights = opt.weights if isinstance(opt.weights, (list, tuple)) else [opt.weights]
    folder = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    written = []
    for w in weights:
        rows = []
        for size in sizes:
            LOGGER.info(f"Running {w} --imgsz {size}...")
            each = {"weights": w, "imgsz": size, "task": "val", "plots": False, "project": folder,
                    "name": f"{Path(w).stem}_{size}", "exist_ok": False}
            r, _ = evaluate(EvalOptions(**{**asdict(opt), **each}))
            rows.append([size, *r.as_row()[:4], *r.speed])
        out = folder / f"study_{Path(opt.data).stem}_{Path(w).stem}.txt"
        out.write_text("".join(" ".join(f"{v:10.4g}" for v in row) + "\n" for row in rows))
        written.append(out)
    plot = plot_study(written, folder / "study.png") if opt.plots else None
    LOGGER.info(f"Study saved to {folder}: {', '.join(p.name for p in written)}"
                f"{', study.png' if plot else ''} (imgsz, P, R, mAP50, mAP50-95, pre, inference, NMS ms)")
    return folder
