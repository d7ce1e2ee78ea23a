"""Detection metrics: matching, per-class AP over IoU 0.50:0.95, P/R/F1, fitness and a confusion matrix.

Conventions (YOLOv5's): boxes are xyxy pixels; ``detections`` are (n, 6) rows
``[x1, y1, x2, y2, conf, cls]`` as produced by ``utils.nms.non_max_suppression``; ``labels`` are (m, 5)
rows ``[cls, x1, y1, x2, y2]``. AP uses COCO's 101-point interpolation, so on the same matches it is
the number pycocotools reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch

from utils.boxes import box_iou

Names = Union[Mapping[int, str], Sequence[str]]


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness, the number best.pt is chosen by: 0.1 * mAP50 + 0.9 * mAP50-95.

    x: (n, >=4) rows whose first columns are [P, R, mAP50, mAP50-95] (a single row (4,) also works).
    Returns (n,).
    """
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    if x.shape[1] < 4:
        raise ValueError(f"fitness: need columns [P, R, mAP50, mAP50-95], got {x.shape[1]} columns")
    weights = np.array([0.0, 0.0, 0.1, 0.9])
    return (x[:, :4] * weights).sum(1)


def smooth(y: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Box-filter a 1-D curve with a window of about ``fraction`` of its length, edges padded."""
    window = (round(len(y) * fraction * 2) // 2) * 2 + 1  # odd, so the output keeps the input length
    pad = np.ones(window // 2)
    padded = np.concatenate((pad * y[0], y, pad * y[-1]), 0)
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Average precision of one class at one IoU threshold, COCO's 101-point way.

    recall, precision: (n,) cumulative values over the detections sorted by falling confidence.
    AP is the mean, over the recall thresholds 0, 0.01, ..., 1, of the best precision reached at a
    recall >= the threshold (0 where the recall is never reached); this is pycocotools' rule.

    Returns (ap, mpre, mrec): mrec/mpre are the curve with sentinels (recall 0 and 1) and the
    precision envelope, (n + 2,) each, for plotting.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"compute_ap: recall {recall.shape} and precision {precision.shape} differ in shape")
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # best precision at this recall or beyond
    if not len(recall):
        return 0.0, mpre, mrec
    envelope = mpre[1:-1]  # the envelope at the real points, without the recall-0 sentinel's 1.0
    thresholds = np.linspace(0.0, 1.0, 101)
    index = np.searchsorted(recall, thresholds, side="left")
    reached = index < len(recall)
    sampled = np.where(reached, envelope[np.minimum(index, len(recall) - 1)], 0.0)
    return float(sampled.mean()), mpre, mrec


def _names_dict(names: Names) -> dict[int, str]:
    if isinstance(names, Mapping):
        return {int(k): str(v) for k, v in names.items()}
    return dict(enumerate(str(n) for n in names))


def _ap_inputs(tp, conf, pred_cls, target_cls) -> tuple[np.ndarray, ...]:
    """Arrays in checked shapes: tp (n, T) float, conf (n,), pred_cls (n,), target_cls (m,)."""
    tp = np.asarray(tp, dtype=np.float64)
    tp = tp[:, None] if tp.ndim == 1 else tp
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    pred_cls = np.asarray(pred_cls, dtype=np.float64).reshape(-1)
    target_cls = np.asarray(target_cls, dtype=np.float64).reshape(-1)
    if not (len(tp) == len(conf) == len(pred_cls)):
        raise ValueError(
            f"ap_per_class: tp ({len(tp)}), conf ({len(conf)}) and pred_cls ({len(pred_cls)}) "
            "must have one entry per prediction"
        )
    return tp, conf, pred_cls, target_cls


def ap_per_class(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    plot: bool = False,
    save_dir: str | Path = ".",
    names: Names = (),
    eps: float = 1e-16,
    prefix: str = "",
) -> tuple[np.ndarray, ...]:
    """Per-class precision, recall, F1 and AP over the whole dataset.

    Args:
        tp: (n, T) bool, prediction i is a true positive at IoU threshold j (T = 10 for 0.50:0.95).
        conf: (n,) prediction confidences; pred_cls: (n,) predicted classes.
        target_cls: (m,) classes of all ground-truth boxes.
        plot: write {prefix}PR_curve.png, F1_curve.png, P_curve.png and R_curve.png into save_dir.
        names: class names, list or {index: name}.

    Returns (tp, fp, p, r, f1, ap, unique_classes), one row per class that has ground truth
    (unique_classes, sorted): tp/fp (nc,) counts, p/r/f1 (nc,) at the confidence where the
    smoothed mean F1 over classes peaks, ap (nc, T).
    """
    tp, conf, pred_cls, target_cls = _ap_inputs(tp, conf, pred_cls, target_cls)
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    unique_classes, n_targets = np.unique(target_cls, return_counts=True)
    num_classes, num_iou = len(unique_classes), tp.shape[1]
    if num_classes == 0:  # no ground truth: nothing to average
        empty = np.zeros(0)
        return empty, empty, empty, empty, empty, np.zeros((0, num_iou)), unique_classes.astype(int)

    px = np.linspace(0, 1, 1000)  # confidence axis of the P/R/F1 curves
    ap = np.zeros((num_classes, num_iou))
    p, r, pr_curve = (np.zeros((num_classes, 1000)) for _ in range(3))
    for ci, c in enumerate(unique_classes):  # a loop over classes; each class is vectorised
        is_class = pred_cls == c
        if not is_class.any():
            continue
        tpc = tp[is_class].cumsum(0)
        fpc = (1 - tp[is_class]).cumsum(0)
        recall = tpc / n_targets[ci]
        precision = tpc / (tpc + fpc)
        # conf falls along the list, so interpolate on -conf (np.interp needs a rising x)
        r[ci] = np.interp(-px, -conf[is_class], recall[:, 0], left=0)
        p[ci] = np.interp(-px, -conf[is_class], precision[:, 0], left=1)
        for j in range(num_iou):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0:
                pr_curve[ci] = np.interp(px, mrec, mpre)

    f1 = 2 * p * r / (p + r + eps)
    if plot:
        _plot_class_curves(px, pr_curve, p, r, f1, ap, unique_classes, Path(save_dir), names, prefix)
    best = smooth(f1.mean(0), 0.1).argmax()
    p, r, f1 = p[:, best], r[:, best], f1[:, best]
    tp_count = (r * n_targets).round()
    fp_count = (tp_count / (p + eps) - tp_count).round()
    return tp_count, fp_count, p, r, f1, ap, unique_classes.astype(int)


def _plot_class_curves(px, pr_curve, p, r, f1, ap, unique_classes, save_dir, names, prefix) -> None:
    from utils.plots import plot_mc_curve, plot_pr_curve  # matplotlib only when plotting

    all_names = _names_dict(names)
    class_names = [all_names.get(int(c), str(int(c))) for c in unique_classes]
    save_dir.mkdir(parents=True, exist_ok=True)
    plot_pr_curve(px, pr_curve, ap, save_dir / f"{prefix}PR_curve.png", class_names)
    plot_mc_curve(px, f1, save_dir / f"{prefix}F1_curve.png", class_names, ylabel="F1")
    plot_mc_curve(px, p, save_dir / f"{prefix}P_curve.png", class_names, ylabel="Precision")
    plot_mc_curve(px, r, save_dir / f"{prefix}R_curve.png", class_names, ylabel="Recall")


def _check_rows(name: str, rows: torch.Tensor, width: int, layout: str) -> None:
    if rows.dim() != 2 or rows.shape[1] < width:
        raise ValueError(f"{name} must be (n, {width}) {layout}, got shape {tuple(rows.shape)}")


def match_predictions(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Mark each detection as a true positive or not at every IoU threshold (YOLOv5's process_batch).

    Args:
        detections: (n, 6) [x1, y1, x2, y2, conf, cls], pixels.
        labels: (m, 5) [cls, x1, y1, x2, y2], same pixels.
        iouv: (T,) IoU thresholds, e.g. torch.linspace(0.5, 0.95, 10).

    Returns (n, T) bool on iouv's device. At each threshold the matching is one-to-one: pairs of the
    same class with IoU >= threshold are candidates; each detection keeps its highest-IoU label;
    when several detections keep the same label, the most confident one wins it (ties: the earlier
    row). pycocotools instead walks detections by confidence, each taking its best free label;
    the two differ only when boxes of one class crowd together.
    """
    _check_rows("match_predictions: detections", detections, 6, "[x1, y1, x2, y2, conf, cls]")
    _check_rows("match_predictions: labels", labels, 5, "[cls, x1, y1, x2, y2]")
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    if not len(detections) or not len(labels):
        return torch.from_numpy(correct).to(iouv.device)
    detections, labels = detections.float(), labels.float().to(detections.device)
    iou = box_iou(labels[:, 1:5], detections[:, :4])  # (m, n)
    same_class = labels[:, 0:1] == detections[:, 5]
    # rank 0 = the most confident detection; stable so equal confidences keep row order
    rank = np.argsort(np.argsort(-detections[:, 4].cpu().numpy(), kind="stable"), kind="stable")
    for j, threshold in enumerate(iouv.tolist()):
        label_idx, det_idx = torch.where((iou >= threshold) & same_class)
        if not len(label_idx):
            continue
        pairs = np.stack(
            (label_idx.cpu().numpy(), det_idx.cpu().numpy(), iou[label_idx, det_idx].cpu().numpy()), 1
        )
        pairs = pairs[np.argsort(-pairs[:, 2], kind="stable")]
        pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]  # best label per detection
        pairs = pairs[np.argsort(rank[pairs[:, 1].astype(int)], kind="stable")]
        pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]  # most confident detection per label
        correct[pairs[:, 1].astype(int), j] = True
    return torch.from_numpy(correct).to(iouv.device)


def _one_to_one_by_iou(iou: torch.Tensor, iou_thres: float) -> np.ndarray:
    """(m labels, n detections) IoU -> (k, 2) [label, detection] pairs, greedy by IoU, IoU > iou_thres."""
    label_idx, det_idx = torch.where(iou > iou_thres)
    if not len(label_idx):
        return np.zeros((0, 2), dtype=int)
    pairs = np.stack(
        (label_idx.cpu().numpy(), det_idx.cpu().numpy(), iou[label_idx, det_idx].cpu().numpy()), 1
    )
    pairs = pairs[np.argsort(-pairs[:, 2], kind="stable")]
    pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]
    pairs = pairs[np.argsort(-pairs[:, 2], kind="stable")]
    pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]
    return pairs[:, :2].astype(int)


class ConfusionMatrix:
    """Counts of (predicted class, true class), with a background class at index nc.

    ``matrix[p, t]``: rows are predictions, columns the truth. A label with no detection counts in
    the background row (missed); a detection with no label counts in the background column (false
    alarm). Matching ignores the class, so mix-ups between classes show off the diagonal.
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45) -> None:
        if nc < 1:
            raise ValueError(f"ConfusionMatrix: nc must be >= 1, got {nc}")
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1))

    def _check_classes(self, what: str, classes: np.ndarray) -> None:
        bad = (classes < 0) | (classes >= self.nc)
        if bad.any():
            raise ValueError(f"ConfusionMatrix: {what} class {classes[bad][0]} is outside 0..{self.nc - 1}")

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Add one image. detections: (n, 6) [x1, y1, x2, y2, conf, cls] or None (no predictions);
        labels: (m, 5) [cls, x1, y1, x2, y2]. Detections at or below ``conf`` are ignored."""
        _check_rows("ConfusionMatrix: labels", labels, 5, "[cls, x1, y1, x2, y2]")
        gt_classes = labels[:, 0].long().cpu().numpy()
        self._check_classes("label", gt_classes)
        if detections is None or not len(detections):
            np.add.at(self.matrix, (self.nc, gt_classes), 1)  # every label missed
            return
        _check_rows("ConfusionMatrix: detections", detections, 6, "[x1, y1, x2, y2, conf, cls]")
        detections = detections[detections[:, 4] > self.conf]
        det_classes = detections[:, 5].long().cpu().numpy()
        self._check_classes("detection", det_classes)
        iou = box_iou(labels[:, 1:5].float(), detections[:, :4].float().to(labels.device))
        pairs = _one_to_one_by_iou(iou, self.iou_thres)
        np.add.at(self.matrix, (det_classes[pairs[:, 1]], gt_classes[pairs[:, 0]]), 1)
        missed = np.ones(len(gt_classes), dtype=bool)
        missed[pairs[:, 0]] = False
        np.add.at(self.matrix, (self.nc, gt_classes[missed]), 1)
        # YOLOv5 skips this when nothing matched; every unmatched detection is a false alarm here.
        unmatched = np.ones(len(det_classes), dtype=bool)
        unmatched[pairs[:, 1]] = False
        np.add.at(self.matrix, (det_classes[unmatched], self.nc), 1)

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """(nc,) true positives (the diagonal) and false positives (rest of each prediction row)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, normalize: bool = True, save_dir: str | Path = "", names: Names = ()) -> Path:
        """Write confusion_matrix.png into save_dir (columns normalised to sum 1 when normalize)."""
        from utils.plots import plot_confusion_matrix  # matplotlib only when plotting

        all_names = _names_dict(names)
        class_names = [all_names.get(i, str(i)) for i in range(self.nc)] if all_names else []
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        return plot_confusion_matrix(self.matrix, save_dir / "confusion_matrix.png", class_names, normalize)


def labels_to_class_weights(labels: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """(nc,) weights summing to 1, inversely proportional to each class's box count over `labels`
    (per image (n, 5) [class, x, y, w, h]); a class with no box counts as one (YOLOv5's rule)."""
    classes = np.concatenate([lb[:, 0] for lb in labels if len(lb)] or [np.zeros(0)]).astype(int)
    counts = np.bincount(classes, minlength=nc)[:nc].astype(float)
    counts[counts == 0] = 1
    weights = 1 / counts
    return weights / weights.sum()


def labels_to_image_weights(labels: Sequence[np.ndarray], nc: int, class_weights: np.ndarray) -> np.ndarray:
    """(n_images,) sampling weight of each image: the sum over its boxes of their class weights (an
    image without boxes weighs 0, as in YOLOv5)."""
    counts = np.array([np.bincount(lb[:, 0].astype(int), minlength=nc)[:nc] for lb in labels]).reshape(-1, nc)
    return (counts * np.asarray(class_weights).reshape(1, nc)).sum(1)
