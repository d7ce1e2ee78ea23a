"""How many positive anchors the boxes of each class get from a DetectAF model's task-aligned assigner.

    python -m engine.assign_report --weights best.pt --data bccd.yaml --imgsz 320 --batches 6

Training batches (mosaic and the rest of the training augmentation, the checkpoint's hyp values) go
through the model and the assigner exactly as in its loss (the checkpoint's af_topk and af_min_side,
or those of --hyp). Per class it prints the boxes seen, the candidate anchors per box (centres inside
the box, short sides grown to af_min_side), the positives per box and the share of boxes left without
any positive, then how well the model already predicts them: the mean over boxes of the best IoU
reached by the boxes predicted at its positives, and the mean target score of the positives (their class
target, and their box-loss weight with YOLOv8's `af_box_score_power: 1`). A class with few candidates or
many boxes without positives (small objects on a coarse grid) is what af_min_side and af_topk change; a
class with a low best IoU and near-zero target scores is one the head does not learn to localise under
score-weighted box losses (docs/heads.md).
"""

from __future__ import annotations

import argparse
import itertools
import logging
from dataclasses import dataclass

import torch

from engine.checkpoint import load_detection_model
from models.heads import is_anchor_free
from utils.loss_af import AnchorFreeLoss


@dataclass
class ClassAssignment:
    """Counts over the boxes of one class."""

    boxes: int = 0
    without_positives: int = 0
    positives: int = 0
    candidates: int = 0
    best_iou: float = 0.0  # summed over boxes: the best IoU of the boxes predicted at its positives
    target_score: float = 0.0  # summed over positives

    HEADER = ("class", "boxes", "candidates/box", "positives/box", "without positives", "best IoU/box",
              "target/positive")

    def line(self, name: str) -> str:
        n, p = max(self.boxes, 1), max(self.positives, 1)
        return (f"{name:>16} {self.boxes:>7} {self.candidates / n:>14.2f} {self.positives / n:>13.2f} "
                f"{self.without_positives / n:>17.1%} {self.best_iou / n:>12.3f} "
                f"{self.target_score / p:>15.3f}")


def count_assignments(criterion: AnchorFreeLoss, maps: list[torch.Tensor], targets: torch.Tensor,
                      counts: dict[int, ClassAssignment]) -> None:
    """Add one batch's per-box candidates and positives to `counts` (keyed by class id)."""
    step = criterion.assign(maps, targets)
    candidates = criterion.assigner.candidates(step.points * step.strides, step.gt_boxes, step.gt_mask)
    assigned = step.assigned
    slots = torch.arange(step.gt_mask.shape[1], device=step.gt_mask.device)[None, :, None]
    mine = assigned.foreground[:, None, :] & (assigned.gt_index[:, None, :] == slots)  # (B, M, N)
    positives = mine.sum(-1)  # (B, M)
    iou = _predicted_iou(step)  # (B, N), 0 off the positives
    best_iou = (iou[:, None, :] * mine).amax(-1)  # (B, M)
    score = (assigned.scores.sum(-1)[:, None, :] * mine).sum(-1)  # (B, M) summed over each box's positives
    for b, m in step.gt_mask.nonzero().tolist():
        entry = counts.setdefault(int(step.gt_labels[b, m]), ClassAssignment())
        entry.boxes += 1
        entry.candidates += int(candidates[b, m].sum())
        entry.positives += int(positives[b, m])
        entry.without_positives += int(positives[b, m] == 0)
        entry.best_iou += float(best_iou[b, m])
        entry.target_score += float(score[b, m])


def _predicted_iou(step) -> torch.Tensor:
    """(B, N) IoU of each positive anchor's predicted box with the box it is assigned to; 0 elsewhere."""
    from utils.boxes import bbox_iou

    foreground = step.assigned.foreground
    iou = torch.zeros(foreground.shape, device=foreground.device)
    b, n = foreground.nonzero(as_tuple=True)
    predicted = step.pred_boxes[b, n] * step.strides[n]
    iou[b, n] = bbox_iou(predicted, step.assigned.boxes[b, n], xywh=False).view(-1).clamp(0)
    return iou


def assignment_report(weights: str, data: str, imgsz: int = 640, batch_size: int = 16, batches: int = 6,
                      hyp: dict | None = None, workers: int = 0, seed: int = 0) -> dict[str, ClassAssignment]:
    """Assignment counts by class name over `batches` training batches of `data` (module docstring)."""
    from data.config import check_dataset
    from data.loaders import create_dataloader

    model = load_detection_model(weights, fuse=False)
    if not is_anchor_free(model.model[-1]):
        raise ValueError(f"{weights}: the assignment report is for DetectAF models; this one ends in "
                         f"{type(model.model[-1]).__name__}")
    model.hyp = {**model.hyp, **(hyp or {})}
    criterion = AnchorFreeLoss(model)
    cfg = check_dataset(data)
    loader, _ = create_dataloader(cfg["train"], imgsz, batch_size, int(model.stride.max()), hyp=model.hyp,
                                  augment=True, workers=workers, shuffle=True, seed=seed, names=cfg["names"],
                                  prefix="assign: ")
    counts: dict[int, ClassAssignment] = {}
    with torch.no_grad():
        for imgs, targets, *_ in itertools.islice(loader, batches):
            _, maps = model(imgs.float() / 255)
            count_assignments(criterion, maps, targets, counts)
    names = list(model.names)
    return {names[cls] if cls < len(names) else str(cls): entry for cls, entry in sorted(counts.items())}


def main(argv: list[str] | None = None) -> int:
    from utils.general import resolve_config, yaml_load

    parser = argparse.ArgumentParser(prog="python -m engine.assign_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="a DetectAF checkpoint (.pt)")
    parser.add_argument("--data", default="builtin.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--hyp", default="",
                        help="hyp YAML whose values replace the checkpoint's (af_min_side, af_topk, ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    hyp = yaml_load(resolve_config(args.hyp, "hyps")) if args.hyp else None
    counts = assignment_report(args.weights, args.data, args.imgsz, args.batch_size, args.batches, hyp)
    print("{:>16} {:>7} {:>14} {:>13} {:>17} {:>12} {:>15}".format(*ClassAssignment.HEADER))
    for name, entry in counts.items():
        print(entry.line(name))
    return 0


if __name__ == "__main__":
    from engine.cli import run_cli

    run_cli(main)
