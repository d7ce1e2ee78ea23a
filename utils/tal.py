"""Task-aligned target assignment (TOOD, Feng et al. 2021, arXiv:2108.07755), as YOLOv8 uses it.

For every ground-truth box g and anchor point a whose centre lies inside g, the alignment metric is

    t(a, g) = s(a, class of g) ** alpha * IoU(box predicted at a, g) ** beta     (alpha 0.5, beta 6.0)

with s the predicted class probability and IoU the CIoU clamped at 0. Each g takes the `topk` anchors
with the highest t (among those inside it; ties go to the lower anchor index). An anchor taken by
several boxes keeps the one whose IoU with its prediction is highest. The class target of an assigned
anchor is the one-hot class scaled by t(a, g) / max_a' t(a', g) * max_a' IoU(a', g) over the anchors g
took: the best-aligned anchor of each box is asked for a score equal to the best IoU reached on that box,
the others for less. The ratio has no absolute floor (`eps` 0): YOLOv8 divides by max t + 1e-9, and with
t = s^0.5 x IoU^6 a small box at the start of training (IoU ~0.02 with the large boxes an untrained head
predicts, s ~1e-4) has max t ~1e-12, so its targets round to 0: no class target and no box loss until
the boxes predicted around it happen to shrink (BCCD's platelets at 320 px, docs/heads.md).

Small boxes (`min_side`, pixels; 0 = off): a box side shorter than min_side is grown to min_side about
the box centre for the "centre inside the box" test only (IoUs and regression targets keep the real
box). A box a few cells wide otherwise has only a handful of candidate anchors, fewer than `topk`,
and loses some of them to larger overlapping boxes. Ultralytics' STAL does the same for sides below
the smallest stride (grown to the second stride).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.boxes import bbox_iou

INSIDE_EPS = 1e-9  # an anchor point on a box side is outside


@dataclass
class Assignment:
    """Targets per anchor (B images, N anchors, nc classes).

    labels (B, N) long class ids and boxes (B, N, 4) [x1, y1, x2, y2] in the gt boxes' units; scores
    (B, N, nc) normalised alignment targets; foreground (B, N) bool; gt_index (B, N) long index of the
    assigned gt box in its image. All of them are 0 on background anchors.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    foreground: torch.Tensor
    gt_index: torch.Tensor


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, 2) points, (..., 4) boxes [x1, y1, x2, y2] -> (..., N) bool: point strictly inside box."""
    left_top = (points - boxes[..., None, :2]).amin(-1)
    right_bottom = (boxes[..., None, 2:] - points).amin(-1)
    return (left_top > INSIDE_EPS) & (right_bottom > INSIDE_EPS)


@dataclass
class _Pairs:
    """Candidate (box, anchor) pairs of a batch: box g (index into the batch's G real boxes), anchor n,
    image b = the box's image; iou and metric per pair."""

    box: torch.Tensor
    anchor: torch.Tensor
    image: torch.Tensor
    iou: torch.Tensor
    metric: torch.Tensor

    def subset(self, keep: torch.Tensor) -> _Pairs:
        return _Pairs(self.box[keep], self.anchor[keep], self.image[keep], self.iou[keep], self.metric[keep])


class TaskAlignedAssigner:
    """`assigner(scores, boxes, points, gt_labels, gt_boxes, gt_mask)` -> Assignment (no gradients).

    It works on the candidate pairs only (anchor centres inside a real box: a few dozen per box), not on
    dense (images x padded boxes x anchors) tensors: on BCCD batches that is most of the loss's time.
    """

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 0.0,
                 min_side: float = 0.0):
        """eps: added to each box's best alignment before dividing by it; 0 (default) divides by the best
        alignment itself (relative), YOLOv8 uses 1e-9 (module docstring)."""
        self.topk, self.alpha, self.beta, self.eps, self.min_side = topk, alpha, beta, eps, float(min_side)

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor,
                 gt_labels: torch.Tensor, gt_boxes: torch.Tensor, gt_mask: torch.Tensor) -> Assignment:
        """scores (B, N, nc) class probabilities; boxes (B, N, 4) predicted [x1, y1, x2, y2]; points (N, 2)
        anchor centres in the same units; gt_labels (B, M) long; gt_boxes (B, M, 4); gt_mask (B, M) bool
        (False for the padding rows of images with fewer than M boxes)."""
        image, slot = gt_mask.nonzero(as_tuple=True)  # the G real boxes, image-major
        labels, real_boxes = gt_labels[image, slot], gt_boxes[image, slot]
        pairs = self._candidate_pairs(scores, boxes, points, image, labels, real_boxes)
        pairs = pairs.subset(_rank_within(pairs.box, pairs.metric, len(image)) < self.topk)  # topk per box
        # an anchor taken by several boxes keeps the one with the highest IoU (ties: the lower box index)
        batch, anchors = scores.shape[:2]
        anchor_id = pairs.image * anchors + pairs.anchor
        pairs = pairs.subset(_rank_within(anchor_id, pairs.iou, batch * anchors) == 0)
        return self._targets(pairs, scores, gt_boxes, slot, labels, real_boxes)

    def candidates(self, points: torch.Tensor, gt_boxes: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
        """(B, M, N) bool: anchor centres inside each real gt box (its short sides grown to min_side)."""
        return points_in_boxes(points, self._candidate_region(gt_boxes)) & gt_mask[..., None]

    def _candidate_region(self, gt_boxes: torch.Tensor) -> torch.Tensor:
        """The boxes whose insides make the candidate anchors: sides below min_side grown to it."""
        if self.min_side <= 0:
            return gt_boxes
        centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        half = (gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=self.min_side) / 2
        return torch.cat((centre - half, centre + half), -1)

    def _candidate_pairs(self, scores, boxes, points, image, labels, real_boxes) -> _Pairs:
        """Every (real box, anchor inside it) pair with its CIoU (clamped at 0) and alignment metric."""
        box, anchor = points_in_boxes(points, self._candidate_region(real_boxes)).nonzero(as_tuple=True)
        pair_image = image[box]
        iou = bbox_iou(boxes[pair_image, anchor], real_boxes[box], xywh=False, CIoU=True).view(-1).clamp(0)
        score = scores[pair_image, anchor, labels[box]]
        return _Pairs(box, anchor, pair_image, iou, score.pow(self.alpha) * iou.pow(self.beta))

    def _targets(self, pairs: _Pairs, scores, gt_boxes, slot, labels, real_boxes) -> Assignment:
        batch, anchors, nc = scores.shape
        out_labels = torch.zeros(batch, anchors, dtype=torch.long, device=scores.device)  # 0 on background
        out_boxes = gt_boxes.new_zeros(batch, anchors, 4)
        out_scores = torch.zeros_like(scores)
        foreground = torch.zeros(batch, anchors, dtype=torch.bool, device=scores.device)
        gt_index = torch.zeros(batch, anchors, dtype=torch.long, device=scores.device)
        if len(pairs.box):
            best_metric = _group_max(pairs.metric, pairs.box, len(slot))
            best_iou = _group_max(pairs.iou, pairs.box, len(slot))
            floor = self.eps if self.eps > 0 else torch.finfo(best_metric.dtype).tiny  # 0 / tiny = 0
            normalised = pairs.metric * best_iou[pairs.box] / (best_metric[pairs.box] + floor)
            b, n, pair_labels = pairs.image, pairs.anchor, labels[pairs.box]
            out_labels[b, n], gt_index[b, n] = pair_labels, slot[pairs.box]
            out_boxes[b, n] = real_boxes[pairs.box]
            foreground[b, n] = True
            out_scores[b, n, pair_labels] = normalised.to(out_scores.dtype)
        return Assignment(out_labels, out_boxes, out_scores, foreground, gt_index)


def _rank_within(group: torch.Tensor, value: torch.Tensor, groups: int) -> torch.Tensor:
    """Rank of each element by descending value within its group (0 = best); ties keep the elements' order."""
    order = value.sort(descending=True, stable=True).indices
    order = order[group[order].sort(stable=True).indices]  # group by group, best value first
    counts = torch.bincount(group, minlength=groups)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[group[order]]
    return rank


def _group_max(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups,) max of `values` per group (0 for an empty group; the values are >= 0)."""
    return values.new_zeros(groups).scatter_reduce(0, group, values, "amax", include_self=True)
