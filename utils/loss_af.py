"""The loss of the anchor-free head DetectAF (YOLOv8's recipe) and the factory that picks a model's loss.

    criterion = build_criterion(model)   # ComputeLoss for Detect, AnchorFreeLoss for DetectAF
    loss, items = criterion(preds, targets)

Conventions (as ComputeLoss):
  targets  (M, 6) float [image_index, class, x, y, w, h], x y w h normalised to the input image
  preds    list of nl raw maps (B, 4 * reg_max + nc, ny, nx): box-side distribution logits, class logits
Targets are assigned by task alignment (utils/tal.py) on the detached predictions. With S the sum of
all target scores (at least 1):
  cls  BCE of the class logits against the soft targets, summed over anchors and classes, / S
  box  sum over assigned anchors of (1 - CIoU) x w, / the sum of w (at least 1), w = the anchor's target
       score ** af_box_score_power: the default 0 counts every assigned anchor the same (the mean over them),
       YOLOv8's 1 weights each by its target score
  dfl  the same weighting of the distribution focal loss (arXiv:2006.04388) of the four sides: each
       target distance d (cells, clamped below reg_max - 1) is the mixture of its two neighbouring integer
       bins, cross-entropy to floor(d) weighted by ceil-side distance and to floor(d) + 1 by the rest
The returned loss is (af_box x box + af_dfl x dfl + af_cls x cls) x batch size, the items [box, dfl, cls]
(the trainer's three loss columns; the middle one, 'obj' for Detect, holds the DFL term here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.anchor_points import (
    boxes_to_distances,
    distances_to_boxes,
    distribution_expectation,
    make_anchor_points,
)
from utils.boxes import bbox_iou, xywh2xyxy
from utils.optim import de_parallel
from utils.tal import Assignment, TaskAlignedAssigner

# hyp keys of this loss and their defaults (YOLOv8's gains box 7.5, cls 0.5, dfl 1.5; assigner top 10;
# af_min_side: box sides below this many smallest-level strides are grown to it when the assigner looks
# for the anchors inside a box, 0 = off). The gains are used as given: unlike YOLOv5's, they are not
# rescaled by levels, classes or image size.
# af_box_score_power: each positive's box and DFL loss is weighted by its target score ** this. YOLOv8 uses 1;
# the default 0 weighs every positive the same: with 1 a box whose predictions overlap it poorly (small
# objects: their alignment goes with IoU ** 6) gets almost no box loss and stays poorly predicted
# (docs/heads.md, BCCD's platelets).
AF_DEFAULTS = {"af_box": 7.5, "af_cls": 0.5, "af_dfl": 1.5, "af_topk": 10, "af_min_side": 0.0,
               "af_box_score_power": 0.0}
ASSIGNER_ALPHA, ASSIGNER_BETA = 0.5, 6.0  # TOOD's exponents of the class score and the IoU


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, reg_max) logits, (n,) target distances in [0, reg_max - 1) -> (n,) DFL.

    The target is split between its neighbouring bins: for d = 2.3 the loss is
    0.7 x CE(logits, 2) + 0.3 x CE(logits, 3); it is smallest when softmax puts 0.7 on bin 2, 0.3 on 3.
    """
    left = target.long()
    right = left + 1
    weight_left = right.to(target.dtype) - target
    return (F.cross_entropy(logits, left, reduction="none") * weight_left
            + F.cross_entropy(logits, right, reduction="none") * (1 - weight_left))


@dataclass
class AssignedBatch:
    """One batch as the loss sees it (B images, N anchors, M the most boxes of an image).

    box_logits (B, N, 4 * reg_max), cls_logits (B, N, nc); pred_boxes (B, N, 4) and points (N, 2) in cells
    of each anchor's level, strides (N, 1); gt_labels (B, M), gt_boxes (B, M, 4) [x1, y1, x2, y2] pixels,
    gt_mask (B, M) (False for padding); assigned: the task-aligned assignment.
    """

    box_logits: torch.Tensor
    cls_logits: torch.Tensor
    pred_boxes: torch.Tensor
    points: torch.Tensor
    strides: torch.Tensor
    gt_labels: torch.Tensor
    gt_boxes: torch.Tensor
    gt_mask: torch.Tensor
    assigned: Assignment


class AnchorFreeLoss:
    """Loss of a model whose last layer is DetectAF; gains and assigner settings from `model.hyp` (the af_*
    keys of AF_DEFAULTS), AF_DEFAULTS for the keys it does not have."""

    loss_names = ("box", "dfl", "cls")

    def __init__(self, model: nn.Module):
        bare = de_parallel(model)
        hyp = getattr(bare, "hyp", None)
        hyp = hyp if isinstance(hyp, Mapping) else {}
        self.head = bare.model[-1]
        self.nc, self.reg_max = int(self.head.nc), int(self.head.reg_max)
        self.gains = {k: float(hyp.get(k, v)) for k, v in AF_DEFAULTS.items()}
        min_side = self.gains["af_min_side"] * float(self.head.stride.min())  # strides -> pixels
        self.assigner = TaskAlignedAssigner(int(self.gains["af_topk"]), ASSIGNER_ALPHA, ASSIGNER_BETA,
                                            min_side=min_side)

    def __call__(self, preds: Sequence[torch.Tensor],
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (total loss * batch size, shape (1,); detached [box, dfl, cls] losses, shape (3,))."""
        step = self.assign(preds, targets)
        assigned, batch = step.assigned, step.gt_mask.shape[0]
        score_sum = assigned.scores.sum().clamp(min=1.0)
        cls_loss = F.binary_cross_entropy_with_logits(step.cls_logits, assigned.scores, reduction="sum")
        cls_loss = cls_loss / score_sum
        box_loss, dfl_loss = self._box_losses(step.box_logits, step.pred_boxes, step.points, step.strides,
                                              assigned)
        box_loss = box_loss * self.gains["af_box"]
        dfl_loss = dfl_loss * self.gains["af_dfl"]
        cls_loss = cls_loss * self.gains["af_cls"]
        total = (box_loss + dfl_loss + cls_loss).view(1) * batch
        return total, torch.stack((box_loss, dfl_loss, cls_loss)).detach()

    def assign(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> AssignedBatch:
        """A batch's predictions split and decoded, its targets padded per image, and their assignment."""
        self._check_inputs(preds, targets)
        preds = [p.float() for p in preds]  # autocast may hand float16/bf16 maps: the loss runs in float32
        points, strides = make_anchor_points(preds, self.head.stride.to(preds[0].device))
        rows = torch.cat([p.flatten(2) for p in preds], 2).transpose(1, 2)  # (B, N, 4 * reg_max + nc)
        box_logits, cls_logits = rows.split((4 * self.reg_max, self.nc), -1)
        pred_boxes = distances_to_boxes(distribution_expectation(box_logits, self.reg_max), points)  # cells
        height, width = preds[0].shape[2] * strides[0, 0], preds[0].shape[3] * strides[0, 0]
        targets = targets.to(rows.device).float()
        gt_labels, gt_boxes, gt_mask = self._ground_truth(targets, preds[0].shape[0], height, width)
        assigned = self.assigner(cls_logits.detach().sigmoid(), pred_boxes.detach() * strides,
                                 points * strides, gt_labels, gt_boxes, gt_mask)
        return AssignedBatch(box_logits, cls_logits, pred_boxes, points, strides, gt_labels, gt_boxes,
                             gt_mask, assigned)

    def _box_losses(self, box_logits, pred_boxes, points, strides, assigned):
        """(CIoU loss, DFL) of the assigned anchors, each weighted by its target score ** af_box_score_power,
        / the sum of those weights (at least 1). With power 1 the weights sum to S."""
        foreground = assigned.foreground
        if not foreground.any():
            zero = box_logits.sum() * 0.0  # keeps the graph (and DDP) aware of every parameter
            return zero, zero
        weight = assigned.scores.sum(-1)[foreground]  # (P,)
        power = self.gains["af_box_score_power"]
        weight = torch.ones_like(weight) if power == 0 else weight if power == 1 else weight.pow(power)
        weight_sum = weight.sum().clamp(min=1.0)
        target_boxes = assigned.boxes / strides  # cells of each anchor's level
        iou = bbox_iou(pred_boxes[foreground], target_boxes[foreground], xywh=False, CIoU=True).squeeze(-1)
        box_loss = ((1.0 - iou) * weight).sum() / weight_sum
        target = boxes_to_distances(points, target_boxes, self.reg_max - 1 - 0.01)[foreground]  # (P, 4)
        logits = box_logits[foreground].reshape(-1, self.reg_max)
        dfl = distribution_focal_loss(logits, target.reshape(-1)).view(-1, 4).mean(-1)
        return box_loss, (dfl * weight).sum() / weight_sum

    @staticmethod
    def _ground_truth(targets: torch.Tensor, batch: int, height, width):
        """(M, 6) rows -> labels (B, K) long, boxes (B, K, 4) [x1, y1, x2, y2] pixels, mask (B, K) bool,
        K the most boxes any image has (images with fewer are padded, mask False)."""
        image = targets[:, 0].long()
        counts = torch.bincount(image, minlength=batch) if len(targets) else targets.new_zeros(batch).long()
        k = int(counts.max()) if len(targets) else 0
        labels = torch.zeros(batch, k, dtype=torch.long, device=targets.device)
        boxes = torch.zeros(batch, k, 4, device=targets.device)
        order = image.argsort(stable=True)
        slot = torch.arange(len(targets), device=targets.device) - (counts.cumsum(0) - counts)[image[order]]
        labels[image[order], slot] = targets[order, 1].long()
        scale = torch.stack((width, height, width, height)).to(targets)
        boxes[image[order], slot] = xywh2xyxy(targets[order, 2:6] * scale)
        mask = torch.arange(k, device=targets.device)[None] < counts[:, None]
        return labels, boxes, mask

    def _check_inputs(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> None:
        channels = 4 * self.reg_max + self.nc
        if len(preds) != int(self.head.nl):
            raise ValueError(f"AnchorFreeLoss: expected {self.head.nl} prediction maps, got {len(preds)}")
        for level, pred in enumerate(preds):
            if pred.ndim != 4 or pred.shape[1] != channels:
                raise ValueError(f"AnchorFreeLoss: level {level} predictions have shape {tuple(pred.shape)}, "
                                 f"expected (B, {channels}, ny, nx)")
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"AnchorFreeLoss: targets must be (M, 6) [image, class, x, y, w, h], got "
                             f"{tuple(targets.shape)}")
        images, classes = targets[:, 0], targets[:, 1]
        bad = (classes < 0) | (classes >= self.nc) | (images < 0) | (images >= len(preds[0]))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"AnchorFreeLoss: target row {row} {targets[row].tolist()} has an image index "
                             f"outside [0, {len(preds[0]) - 1}] or a class outside [0, {self.nc - 1}]")


def build_criterion(model: nn.Module):
    """The loss for `model`'s head: YOLOv5's ComputeLoss for Detect, AnchorFreeLoss for DetectAF.
    Set `model.hyp` first (ComputeLoss needs it; AnchorFreeLoss reads its af_* keys from it)."""
    from utils.loss import ComputeLoss

    head = de_parallel(model).model[-1]
    return AnchorFreeLoss(model) if getattr(head, "anchor_free", False) else ComputeLoss(model)
