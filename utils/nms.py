"""Non-maximum suppression for YOLO outputs (YOLOv5 semantics, vectorised per image).

Input rows are ``[x, y, w, h, obj, cls_0 .. cls_{nc-1}]`` with the box as centre/size in pixels of the
network input, exactly what ``DetectionModel`` returns in eval mode. Output rows are
``[x1, y1, x2, y2, conf, cls]`` (corners in the same pixels, conf = obj x cls score, cls as a float).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torchvision

from utils.boxes import xywh2xyxy

Prediction = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_arguments(conf_thres: float, iou_thres: float, max_det: int, max_nms: int) -> None:
    if not 0.0 <= conf_thres <= 1.0:
        raise ValueError(f"non_max_suppression: conf_thres={conf_thres} is outside [0, 1]")
    if not 0.0 <= iou_thres <= 1.0:
        raise ValueError(f"non_max_suppression: iou_thres={iou_thres} is outside [0, 1]")
    if max_det < 1 or max_nms < 1:
        raise ValueError(f"non_max_suppression: max_det={max_det} and max_nms={max_nms} must both be >= 1")


def _as_prediction_tensor(prediction: Prediction) -> torch.Tensor:
    """Accept the (inference, raw maps) pair some YOLO models return in eval and keep the first part."""
    if isinstance(prediction, (list, tuple)):
        if not prediction:
            raise ValueError("non_max_suppression: got an empty list/tuple instead of a prediction tensor")
        prediction = prediction[0]
    if not isinstance(prediction, torch.Tensor) or prediction.dim() != 3 or prediction.shape[2] < 6:
        shape = tuple(prediction.shape) if isinstance(prediction, torch.Tensor) else type(prediction)
        raise ValueError(
            f"non_max_suppression: expected a (batch, boxes, 5 + nc) tensor with nc >= 1, got {shape}"
        )
    return prediction


def _append_labels(x: torch.Tensor, image_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Add ground-truth rows [cls, x, y, w, h] (pixels) as certain predictions (YOLOv5 autolabelling)."""
    image_labels = image_labels.to(device=x.device, dtype=x.dtype)
    if image_labels.dim() != 2 or image_labels.shape[1] < 5:
        raise ValueError(
            f"non_max_suppression: labels must be (m, 5) [cls, x, y, w, h], got {tuple(image_labels.shape)}"
        )
    bad = (image_labels[:, 0] < 0) | (image_labels[:, 0] >= num_classes)
    if bad.any():
        bad_class = image_labels[bad, 0][0].item()
        raise ValueError(f"non_max_suppression: label class {bad_class:g} is outside 0..{num_classes - 1}")
    extra = torch.zeros((len(image_labels), 5 + num_classes), device=x.device, dtype=x.dtype)
    extra[:, :4] = image_labels[:, 1:5]
    extra[:, 4] = 1.0
    extra[torch.arange(len(image_labels), device=x.device), image_labels[:, 0].long() + 5] = 1.0
    return torch.cat((x, extra), 0)


def _candidates(x: torch.Tensor, conf_thres: float, multi_label: bool) -> torch.Tensor:
    """(n, 5 + nc) rows that passed the objectness filter -> (k, 6) [x1, y1, x2, y2, score, cls]."""
    scores = x[:, 5:] * x[:, 4:5]  # score = obj x cls
    box = xywh2xyxy(x[:, :4])
    if multi_label:
        # one candidate per (box, class) pair above the threshold
        row, cls = (scores > conf_thres).nonzero(as_tuple=False).T
        return torch.cat((box[row], scores[row, cls, None], cls[:, None].to(x.dtype)), 1)
    best_score, best_cls = scores.max(1, keepdim=True)
    keep = best_score.view(-1) > conf_thres
    return torch.cat((box, best_score, best_cls.to(x.dtype)), 1)[keep]


def _suppress_one_image(
    x: torch.Tensor,
    conf_thres: float,
    iou_thres: float,
    classes: Sequence[int] | None,
    agnostic: bool,
    multi_label: bool,
    max_det: int,
    max_nms: int,
    max_wh: float,
) -> torch.Tensor:
    """One image's rows (n, 5 + nc), already objectness-filtered -> kept detections (k, 6)."""
    x = _candidates(x, conf_thres, multi_label)
    if classes is not None:
        wanted = torch.tensor(classes, device=x.device, dtype=x.dtype)
        x = x[(x[:, 5:6] == wanted).any(1)]
    if not x.shape[0]:
        return x
    x = x[x[:, 4].argsort(descending=True)[:max_nms]]  # candidate cap, best scores first
    # Shift each class to its own far-away region so one nms call never suppresses across classes.
    offsets = x[:, 5:6] * (0.0 if agnostic else max_wh)
    keep = torchvision.ops.nms(x[:, :4] + offsets, x[:, 4], iou_thres)
    return x[keep[:max_det]]


def non_max_suppression(
    prediction: Prediction,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    labels: Sequence[torch.Tensor] = (),
    max_det: int = 300,
    max_nms: int = 30000,
    max_wh: float = 7680,
) -> list[torch.Tensor]:
    """Filter by score and suppress overlapping boxes, image by image.

    Args:
        prediction: (B, N, 5 + nc) rows [x, y, w, h, obj, cls scores...], boxes in input pixels; a
            list/tuple whose first item is that tensor is also accepted. Any float dtype.
        conf_thres: keep candidates whose score (obj x cls) is above this, in [0, 1]. The objectness
            alone must also be above it (YOLOv5's cheap pre-filter).
        iou_thres: IoU above which the lower-scored of two same-class boxes is removed, in [0, 1].
        classes: keep only these class indices (None keeps all).
        agnostic: suppress across classes as if all boxes had one class.
        multi_label: one candidate per class whose score passes conf_thres (only when nc > 1).
        labels: per image, an (m, 5) tensor [cls, x, y, w, h] (pixels) appended as score-1 candidates
            (autolabelling, as YOLOv5); empty by default.
        max_det: at most this many detections per image, best first.
        max_nms: at most this many candidates (best scores) enter the NMS per image.
        max_wh: class offset in pixels; must exceed the largest box coordinate.

    Returns:
        B tensors (k, 6) [x1, y1, x2, y2, conf, cls], sorted by conf, float32 whatever the input
        dtype: float16 cannot hold class-offset coordinates (7680 * nc) and bfloat16 only keeps about
        three significant digits, so the work is done in float32.
    """
    _check_arguments(conf_thres, iou_thres, max_det, max_nms)
    prediction = _as_prediction_tensor(prediction).float()
    num_classes = prediction.shape[2] - 5
    multi_label = multi_label and num_classes > 1
    passes_objectness = prediction[..., 4] > conf_thres
    output = []
    for image_index, x in enumerate(prediction):  # loop over images only, boxes are vectorised
        x = x[passes_objectness[image_index]]
        if len(labels) and len(labels[image_index]):
            x = _append_labels(x, labels[image_index], num_classes)
        output.append(
            _suppress_one_image(
                x, conf_thres, iou_thres, classes, agnostic, multi_label, max_det, max_nms, max_wh
            )
        )
    return output
