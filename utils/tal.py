"""Task-aligned target assignment (TOOD, Feng et al. 2021, arXiv:2108.07755), as YOLOv8 uses it.

For every ground-truth box g and anchor point a whose centre lies inside g, the alignment metric is

    t(a, g) = s(a, class of g) ** alpha * IoU(box predicted at a, g) ** beta     (alpha 0.5, beta 6.0)

with s the predicted class probability and IoU the CIoU clamped at 0. Each g takes the `topk` anchors
with the highest t (among those inside it). An anchor taken by several boxes keeps the one whose IoU
with its prediction is highest. The class target of an assigned anchor is the one-hot class scaled by
t(a, g) / max_a' t(a', g) * max_a' IoU(a', g) over the anchors g took: the best-aligned anchor of
each box is asked for a score equal to the best IoU reached on that box, the others for less.

Small boxes (`min_side`, pixels; 0 = off): a box side shorter than min_side is grown to min_side about
the box centre for the "centre inside the box" test only (IoUs and regression targets keep the real
box). A box a few cells wide otherwise has only a handful of candidate anchors, fewer than `topk`,
and loses some of them to larger overlapping boxes. Ultralytics' STAL does the same for sides below
the smallest stride (grown to the second stride).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.boxes import bbox_iou

INSIDE_EPS = 1e-9  # an anchor point on a box side is outside


@dataclass
class Assignment:
    """Targets per anchor (B images, N anchors, nc classes).

    labels (B, N) long class ids; boxes (B, N, 4) [x1, y1, x2, y2] in the gt boxes' units; scores (B, N, nc)
    normalised alignment targets (0 for background); foreground (B, N) bool; gt_index (B, N) long index
    of the assigned gt box in its image (0 for background anchors).
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    foreground: torch.Tensor
    gt_index: torch.Tensor


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, 2) points, (B, M, 4) boxes [x1, y1, x2, y2] -> (B, M, N) bool: point strictly inside box."""
    left_top = points[None, None] - boxes[..., None, :2]
    right_bottom = boxes[..., None, 2:] - points[None, None]
    return torch.cat((left_top, right_bottom), -1).amin(-1) > INSIDE_EPS


class TaskAlignedAssigner:
    """`assigner(scores, boxes, points, gt_labels, gt_boxes, gt_mask)` -> Assignment (no gradients)."""

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9,
                 min_side: float = 0.0):
        self.topk, self.alpha, self.beta, self.eps, self.min_side = topk, alpha, beta, eps, float(min_side)

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor,
                 gt_labels: torch.Tensor, gt_boxes: torch.Tensor, gt_mask: torch.Tensor) -> Assignment:
        """scores (B, N, nc) class probabilities; boxes (B, N, 4) predicted [x1, y1, x2, y2]; points (N, 2)
        anchor centres in the same units; gt_labels (B, M) long; gt_boxes (B, M, 4); gt_mask (B, M) bool
        (False for the padding rows of images with fewer than M boxes)."""
        batch, anchors, nc = scores.shape
        if gt_boxes.shape[1] == 0:
            return self._background(scores, boxes)
        candidate = self.candidates(points, gt_boxes, gt_mask)
        iou = self._ious(boxes, gt_boxes, candidate)
        class_scores = scores.transpose(1, 2).gather(1, gt_labels[..., None].expand(-1, -1, anchors))
        metric = class_scores.pow(self.alpha) * iou.pow(self.beta) * candidate
        positive = self._top_candidates(metric, candidate)
        positive = self._one_gt_per_anchor(positive, iou)
        return self._targets(positive, metric, iou, gt_labels, gt_boxes, nc)

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

    @staticmethod
    def _ious(boxes: torch.Tensor, gt_boxes: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """(B, M, N) CIoU (clamped at 0) of each candidate pair, 0 elsewhere."""
        iou = torch.zeros(candidate.shape, dtype=boxes.dtype, device=boxes.device)
        b, m, n = candidate.nonzero(as_tuple=True)
        if len(b):
            iou[b, m, n] = bbox_iou(boxes[b, n], gt_boxes[b, m], xywh=False, CIoU=True).squeeze(-1).clamp(0)
        return iou

    def _top_candidates(self, metric: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """(B, M, N) bool: the topk anchors of each gt by metric, among its candidates."""
        k = min(self.topk, metric.shape[-1])
        top = metric.topk(k, dim=-1).indices
        chosen = torch.zeros_like(candidate).scatter_(-1, top, True)
        return chosen & candidate

    @staticmethod
    def _one_gt_per_anchor(positive: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
        """An anchor taken by several gts keeps the one (of those) with the highest IoU."""
        shared = positive.sum(1, keepdim=True) > 1  # (B, 1, N)
        if not shared.any():
            return positive
        best = (iou * positive).argmax(1)  # (B, N)
        best_only = F.one_hot(best, positive.shape[1]).transpose(1, 2).bool()  # (B, M, N)
        return torch.where(shared, best_only & positive, positive)

    def _targets(self, positive, metric, iou, gt_labels, gt_boxes, nc) -> Assignment:
        foreground = positive.any(1)  # (B, N)
        gt_index = positive.to(metric.dtype).argmax(1)  # (B, N); 0 for background
        labels = gt_labels.gather(1, gt_index)
        boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))
        metric = metric * positive
        best_metric = metric.amax(-1, keepdim=True)  # (B, M, 1)
        best_iou = (iou * positive).amax(-1, keepdim=True)
        normalised = (metric * best_iou / (best_metric + self.eps)).amax(1)  # (B, N)
        scores = F.one_hot(labels, nc).to(metric.dtype) * (normalised * foreground)[..., None]
        return Assignment(labels, boxes, scores, foreground, gt_index)

    @staticmethod
    def _background(scores: torch.Tensor, boxes: torch.Tensor) -> Assignment:
        batch, anchors, _ = scores.shape
        zeros_long = torch.zeros(batch, anchors, dtype=torch.long, device=scores.device)
        foreground = torch.zeros(batch, anchors, dtype=torch.bool, device=scores.device)
        return Assignment(zeros_long, torch.zeros_like(boxes), torch.zeros_like(scores), foreground,
                          zeros_long.clone())
