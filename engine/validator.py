"""The validation loop shared by val.py and train.py (YOLOv5's val.run, split into short steps).

Predictions are matched to labels in original-image pixels (boxes rescaled through the letterbox of
each image), at IoU thresholds 0.50:0.05:0.95; AP uses COCO's 101-point interpolation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.boxes import scale_boxes, xywh2xyxy, xyxy2xywh
from utils.metrics import ConfusionMatrix, ap_per_class, match_predictions
from utils.nms import non_max_suppression
from utils.torch_utils import time_sync

LOGGER = logging.getLogger(f"vitdet.{__name__}")
IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)
TABLE_HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW_FORMAT = "%22s" + "%11i" * 2 + "%11.3g" * 4


@dataclass
class ValResults:
    """Mean P, R, mAP50, mAP50-95, mean losses [box, obj, cls], per-class mAP50-95 and timings (ms/img)."""

    mp: float = 0.0
    mr: float = 0.0
    map50: float = 0.0
    map: float = 0.0
    losses: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    maps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    speed: tuple[float, float, float] = (0.0, 0.0, 0.0)
    coco: dict | None = None
    json_path: Path | None = None
    per_class: list[tuple] = field(default_factory=list)

    def as_row(self) -> list[float]:
        """[P, R, mAP50, mAP50-95, box, obj, cls] as YOLOv5's results.csv orders them."""
        return [self.mp, self.mr, self.map50, self.map, *self.losses]


@dataclass
class _Accumulator:
    stats: list = field(default_factory=list)
    json_rows: list = field(default_factory=list)
    seen: int = 0


def _forward(model, im: torch.Tensor, augment: bool):
    """(decoded predictions, raw maps or None) from a DetectionModel or an InferenceBackend."""
    out = model(im, augment=True) if augment else model(im)
    return out if isinstance(out, tuple) else (out, None)


def _image_stats(pred, labels, im_shape, shape, ratio_pad, iouv, confusion):
    """Match one image's predictions (n, 6) to its labels (m, 5) [cls, x, y, w, h pixels of im]."""
    nl, npr = labels.shape[0], pred.shape[0]
    correct = torch.zeros(npr, len(iouv), dtype=torch.bool, device=pred.device)
    predn = pred.clone()
    scale_boxes(im_shape, predn[:, :4], shape, ratio_pad)  # native-space predictions
    if nl:
        tbox = xywh2xyxy(labels[:, 1:5])
        scale_boxes(im_shape, tbox, shape, ratio_pad)
        labelsn = torch.cat((labels[:, 0:1], tbox), 1)
        if npr:
            correct = match_predictions(predn, labelsn, iouv)
        if confusion is not None:
            confusion.process_batch(predn if npr else None, labelsn)
    elif npr and confusion is not None:
        confusion.process_batch(predn, torch.zeros(0, 5, device=pred.device))
    stats = (correct.cpu(), pred[:, 4].float().cpu(), pred[:, 5].float().cpu(), labels[:, 0].cpu())
    return stats, predn


def _save_txt(predn: torch.Tensor, shape, file: Path, save_conf: bool) -> None:
    """YOLO-format rows `cls x y w h [conf]`, normalised to the original image."""
    gain = torch.tensor(shape)[[1, 0, 1, 0]]
    lines = []
    for *xyxy, conf, cls in predn.tolist():
        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
        row = (cls, *xywh, conf) if save_conf else (cls, *xywh)
        lines.append(("%g " * len(row)).rstrip() % row)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(line + "\n" for line in lines))


def _output_to_target(preds: list[torch.Tensor]) -> torch.Tensor:
    """NMS output per image -> (M, 7) [img_idx, cls, x, y, w, h, conf] in pixels, for plot_images."""
    rows = []
    for i, p in enumerate(preds):
        p = p[:, :6].float().cpu()
        idx = torch.full((len(p), 1), i, dtype=torch.float32)
        rows.append(torch.cat((idx, p[:, 5:6], xyxy2xywh(p[:, :4]), p[:, 4:5]), 1))
    return torch.cat(rows, 0) if rows else torch.zeros(0, 7)


@dataclass
class ValOptions:
    """How to validate: NMS thresholds, precision and what to write into `save_dir`.

    training=True is the per-epoch validation inside train.py (quieter log, no speed line).
    bf16=True runs the forward of a DetectionModel under bf16 autocast (predictions cast back to float32);
    an InferenceBackend is given its precision when it is built (InferenceBackend(..., bf16=True)).
    """

    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    half: bool = False
    bf16: bool = False
    augment: bool = False
    single_cls: bool = False
    save_dir: Path | None = None
    plots: bool = True
    save_txt: bool = False
    save_conf: bool = False
    save_json: bool = False
    verbose: bool = False
    training: bool = False


class Validator:
    """Validates models on one dataloader: `Validator(loader, names, ValOptions(...))(model)`.

    The model is a DetectionModel or an InferenceBackend; it returns decoded boxes (and the raw maps
    when it can, for the validation loss of `compute_loss`). coco_ids: callable(path) -> COCO image
    id used for --save-json (with an optional `class_map` attribute).
    """

    def __init__(self, dataloader, names: list[str], options: ValOptions | None = None, compute_loss=None,
                 coco_ids=None):
        self.dataloader, self.names = dataloader, list(names)
        self.options = options or ValOptions()
        self.compute_loss, self.coco_ids = compute_loss, coco_ids
        self.nc = 1 if self.options.single_cls else len(self.names)

    @torch.no_grad()
    def __call__(self, model) -> ValResults:
        o = self.options
        device = _device_of(model)
        run = _Run(acc=_Accumulator(), confusion=ConfusionMatrix(nc=self.nc), iouv=IOU_THRESHOLDS.to(device),
                   loss=torch.zeros(3, device=device))
        bar = tqdm(self.dataloader, desc=TABLE_HEADER, bar_format="{l_bar}{bar:10}{r_bar}")
        for batch_i, batch in enumerate(bar):
            im, preds, targets = self._batch(model, batch, device, run)
            self._record(preds, targets, batch, im, run)
            if o.plots and o.save_dir is not None and batch_i < 3:
                self._plot_batch(batch_i, im, targets, batch[2], preds)
        return self._results(run)

    def _batch(self, model, batch, device: torch.device, run: _Run):
        """Pre-process, infer and suppress one batch; adds the stage times and the loss to `run`."""
        o = self.options
        im, targets, _, _ = batch
        t0 = time_sync(device)
        im = im.to(device, non_blocking=True)
        im = (im.half() if o.half else im.float()) / 255
        targets = targets.to(device)
        t1 = time_sync(device)
        bf16 = o.bf16 and isinstance(model, torch.nn.Module)  # a backend applies its own bf16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            preds, train_out = _forward(model, im, o.augment)
        preds = preds.float() if bf16 else preds
        t2 = time_sync(device)
        if self.compute_loss is not None and train_out is not None:
            run.loss += self.compute_loss([x.float() for x in train_out], targets)[1]
        height, width = im.shape[2:]
        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
        preds = non_max_suppression(preds, o.conf_thres, o.iou_thres, multi_label=True, agnostic=o.single_cls,
                                    max_det=o.max_det)
        t3 = time_sync(device)
        run.dt = [run.dt[0] + t1 - t0, run.dt[1] + t2 - t1, run.dt[2] + t3 - t2]
        run.shape = tuple(im.shape)
        return im, preds, targets

    def _record(self, preds, targets, batch, im, run: _Run) -> None:
        """Match each image's predictions to its labels; write its txt/json rows when asked."""
        o = self.options
        _, _, paths, shapes = batch
        for si, pred in enumerate(preds):
            if o.single_cls:
                pred[:, 5] = 0
            labels = targets[targets[:, 0] == si, 1:]
            run.acc.seen += 1
            stats, predn = _image_stats(pred, labels, im[si].shape[1:], shapes[si][0], shapes[si][1],
                                        run.iouv, run.confusion)
            run.acc.stats.append(stats)
            if o.save_txt and o.save_dir is not None:
                label_file = o.save_dir / "labels" / f"{Path(paths[si]).stem}.txt"
                _save_txt(predn, shapes[si][0], label_file, o.save_conf)
            if o.save_json and self.coco_ids is not None:
                _append_json(run.acc.json_rows, predn, self.coco_ids(paths[si]),
                             getattr(self.coco_ids, "class_map", None))

    def _plot_batch(self, batch_i: int, im, targets, paths, preds) -> None:
        from utils.plots import plot_images

        save_dir = self.options.save_dir
        plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", self.names)
        plot_images(im, _output_to_target(preds), paths, save_dir / f"val_batch{batch_i}_pred.jpg",
                    self.names)

    def _results(self, run: _Run) -> ValResults:
        o = self.options
        results = _summarise(run.acc, self.nc, self.names, o.plots, o.save_dir, o.verbose, o.training)
        results.losses = (run.loss.cpu() / max(len(self.dataloader), 1)).tolist()
        results.speed = tuple(t / max(run.acc.seen, 1) * 1e3 for t in run.dt)
        if o.plots and o.save_dir is not None:
            run.confusion.plot(save_dir=o.save_dir, names=self.names)
        if not o.training:
            shape = (getattr(self.dataloader, "batch_size", 1), *run.shape[1:]) if run.acc.seen else ()
            pre, infer, nms = results.speed
            LOGGER.info(f"Speed: {pre:.1f}ms pre-process, {infer:.1f}ms inference, {nms:.1f}ms NMS per image "
                        f"at shape {shape}")
        if o.save_json and o.save_dir is not None:
            results.json_path = _write_json(run.acc.json_rows, o.save_dir)
        return results


@dataclass
class _Run:
    """The running totals of one validation pass."""

    acc: _Accumulator
    confusion: ConfusionMatrix
    iouv: torch.Tensor
    loss: torch.Tensor
    dt: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    shape: tuple[int, ...] = ()


def _device_of(model) -> torch.device:
    """The device of a DetectionModel's parameters or an InferenceBackend's `.device`."""
    if hasattr(model, "device"):
        return torch.device(model.device)
    return next(model.parameters()).device


def _append_json(rows: list, predn: torch.Tensor, image_id, class_map) -> None:
    from utils.coco_eval import predictions_to_coco

    rows.extend(predictions_to_coco([predn], [image_id], class_map))


def _write_json(rows: list, save_dir: Path) -> Path:
    path = save_dir / "predictions.json"
    LOGGER.info(f"Saving {path} ({len(rows)} detections)...")
    path.write_text(json.dumps(rows))
    return path


def _summarise(acc: _Accumulator, nc: int, names, plots, save_dir, verbose, training) -> ValResults:
    """Concatenate per-image stats, compute AP per class and log YOLOv5's table."""
    results = ValResults(maps=np.zeros(nc))
    stats = [torch.cat(x, 0).numpy() for x in zip(*acc.stats)] if acc.stats else []
    if stats and stats[0].any():
        tp, fp, p, r, f1, ap, ap_class = ap_per_class(*stats, plot=plots and save_dir is not None,
                                                      save_dir=save_dir or ".", names=names)
        ap50, ap = ap[:, 0], ap.mean(1)
        results.mp, results.mr, results.map50, results.map = p.mean(), r.mean(), ap50.mean(), ap.mean()
        results.maps[:] = results.map
        for i, c in enumerate(ap_class):
            results.maps[int(c)] = ap[i]
            results.per_class.append((int(c), float(p[i]), float(r[i]), float(ap50[i]), float(ap[i])))
    nt = np.bincount(stats[3].astype(int), minlength=nc) if stats else np.zeros(nc, dtype=int)
    LOGGER.info(TABLE_HEADER)
    LOGGER.info(ROW_FORMAT % ("all", acc.seen, nt.sum(), results.mp, results.mr, results.map50, results.map))
    if nt.sum() == 0:
        LOGGER.warning("no labels found in the validation set, can not compute metrics without labels")
    if (verbose or (nc < 50 and not training)) and nc > 1:
        for c, p, r, ap50, ap in results.per_class:
            LOGGER.info(ROW_FORMAT % (names[c], acc.seen, nt[c], p, r, ap50, ap))
    return results
