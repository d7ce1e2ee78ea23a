"""YOLOv5's detection loss: target assignment, CIoU box loss, IoU-weighted objectness, BCE classes.

Conventions (as YOLOv5):
  targets   (M, 6) float [image_index, class, x, y, w, h], x y w h normalised to the input image
  preds     list of nl raw maps (B, na, ny, nx, nc + 5), channels [x, y, w, h, obj, cls...] as logits
  anchors   the Detect module's `anchors` buffer (nl, na, 2) in stride units (grid cells)
Box predictions decode per cell as xy = 2 * sigmoid - 0.5 (cell units, relative to the cell corner)
and wh = (2 * sigmoid)^2 * anchor (cells), so a box may be predicted from its own cell and from the
two neighbouring cells whose centres it is closest to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from utils.boxes import bbox_iou
from utils.optim import de_parallel

# Objectness weight of each output level, shallow (P3, small objects) to deep.
LEVEL_BALANCE = {3: (4.0, 1.0, 0.4)}
LEVEL_BALANCE_OTHER = (4.0, 1.0, 0.25, 0.06, 0.02)  # YOLOv5's list for P3-P7 heads

# A target is also assigned to the neighbour cell on the side of the half of its own cell it lies
# in (left/up/right/down): offsets in cells, scaled by NEIGHBOUR_REACH.
NEIGHBOUR_REACH = 0.5
NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))  # self, left, up, right, down

REQUIRED_HYP = ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "fl_gamma")


def smooth_BCE(eps: float = 0.1) -> tuple[float, float]:
    """Label-smoothed BCE targets (positive, negative) = (1 - eps/2, eps/2) (arXiv:1902.04103 eq. 3)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class FocalLoss(nn.Module):
    """Focal loss (arXiv:1708.02002) wrapped around a `BCEWithLogitsLoss`.

    Each element's BCE is multiplied by alpha_t * (1 - p_t)^gamma, where p_t is the predicted
    probability of the true label; the wrapped loss's reduction ('mean', 'sum', 'none') is kept.
    """

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn = loss_fcn
        self.loss_fcn.reduction = "none"  # the modulation is per element

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fcn(pred, true)
        prob = pred.sigmoid()
        p_true = true * prob + (1 - true) * (1 - prob)
        alpha_true = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * (alpha_true * (1.0 - p_true) ** self.gamma)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def scale_loss_gains(hyp: Mapping[str, Any], nl: int, nc: int, imgsz: int) -> dict[str, Any]:
    """A copy of `hyp` with the loss gains scaled as YOLOv5's trainer does before building the loss.

    box *= 3 / nl;  cls *= nc / 80 * 3 / nl;  obj *= (imgsz / 640)^2 * 3 / nl
    (the hyp values are tuned for 3 levels, 80 classes and 640 px images).
    """
    missing = [k for k in ("box", "cls", "obj") if k not in hyp]
    if missing:
        raise KeyError(f"hyperparameters are missing the loss gains {missing}")
    scaled = dict(hyp)
    level_factor = 3 / nl
    scaled["box"] = hyp["box"] * level_factor
    scaled["cls"] = hyp["cls"] * nc / 80 * level_factor
    scaled["obj"] = hyp["obj"] * (imgsz / 640) ** 2 * level_factor
    return scaled


class ComputeLoss:
    """YOLOv5's loss for a model whose last layer is a Detect head.

    `model.hyp` supplies the gains (box, obj, cls, already scaled by `scale_loss_gains`), positive
    weights (cls_pw, obj_pw), anchor_t, fl_gamma and optionally label_smoothing. The loss follows
    the Detect module's `anchors` buffer, so AutoAnchor changes made in place are seen.
    """

    loss_names = ("box", "obj", "cls")  # results.csv's train/<name>_loss columns

    sort_obj_iou = False  # YOLOv5's option: write the highest IoU last where targets share a cell

    def __init__(self, model: nn.Module, autobalance: bool = False):
        bare = de_parallel(model)
        hyp = getattr(bare, "hyp", None)
        if not isinstance(hyp, Mapping):
            raise AttributeError("ComputeLoss needs model.hyp, the hyperparameter dict, set beforehand")
        missing = [k for k in REQUIRED_HYP if k not in hyp]
        if missing:
            raise KeyError(f"model.hyp is missing {missing} (see configs/hyps/hyp.scratch-low.yaml)")
        detect = bare.model[-1]
        if int(detect.nl) > len(LEVEL_BALANCE_OTHER):
            raise ValueError(f"ComputeLoss: no objectness balance for {detect.nl} levels (at most 5)")
        self.hyp, self.detect = hyp, detect
        self.nl, self.na, self.nc = int(detect.nl), int(detect.na), int(detect.nc)
        self.device = detect.anchors.device
        self.cp, self.cn = smooth_BCE(eps=float(hyp.get("label_smoothing", 0.0)))
        self.BCEcls, self.BCEobj = self._criteria(hyp)
        self.balance = list(LEVEL_BALANCE.get(self.nl, LEVEL_BALANCE_OTHER[: self.nl]))
        self.autobalance = autobalance
        self.ssi = self._stride16_level(detect) if autobalance else 0  # autobalance keeps it at 1.0
        self.gr = 1.0  # objectness target = gr * IoU + (1 - gr)

    @staticmethod
    def _stride16_level(detect: nn.Module) -> int:
        strides = [int(s) for s in detect.stride]
        if 16 not in strides:
            raise ValueError(f"ComputeLoss: autobalance needs a stride-16 level, the strides are {strides}")
        return strides.index(16)

    @property
    def anchors(self) -> torch.Tensor:
        """(nl, na, 2) anchors in grid cells, read live from the Detect module."""
        return self.detect.anchors

    def _criteria(self, hyp: Mapping[str, Any]) -> tuple[nn.Module, nn.Module]:
        cls_loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(hyp["cls_pw"])], device=self.device))
        obj_loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(hyp["obj_pw"])], device=self.device))
        gamma = float(hyp["fl_gamma"])
        if gamma > 0:
            return FocalLoss(cls_loss, gamma), FocalLoss(obj_loss, gamma)
        return cls_loss, obj_loss

    def __call__(
        self, preds: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (total loss * batch size, shape (1,); detached [box, obj, cls] losses, shape (3,))."""
        self._check_inputs(preds, targets)
        device = preds[0].device
        lbox, lobj, lcls = (torch.zeros(1, device=device) for _ in range(3))
        tcls, tbox, indices, anchors = self.build_targets(preds, targets)

        for level, pred in enumerate(preds):
            image, anchor, gj, gi = indices[level]
            tobj = torch.zeros(pred.shape[:4], dtype=pred.dtype, device=device)
            if image.shape[0]:
                box_loss, iou, cls_loss = self._assigned_losses(pred[image, anchor, gj, gi], tbox[level],
                                                                anchors[level], tcls[level])
                lbox += box_loss
                lcls += cls_loss
                self._write_objectness(tobj, (image, anchor, gj, gi), iou.detach().clamp(0).type(tobj.dtype))
            level_obj = self.BCEobj(pred[..., 4], tobj)
            lobj += level_obj * self.balance[level]
            if self.autobalance:
                self.balance[level] = self.balance[level] * 0.9999 + 0.0001 / level_obj.detach().item()

        if self.autobalance:
            self.balance = [b / self.balance[self.ssi] for b in self.balance]
        lbox *= self.hyp["box"]
        lobj *= self.hyp["obj"]
        lcls *= self.hyp["cls"]
        batch_size = preds[0].shape[0]
        return (lbox + lobj + lcls) * batch_size, torch.cat((lbox, lobj, lcls)).detach()

    def _assigned_losses(
        self, pred: torch.Tensor, tbox: torch.Tensor, anchors: torch.Tensor, tcls: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box loss, IoU (n,) and class loss of the n predictions assigned to targets."""
        pxy, pwh, _, pcls = pred.split((2, 2, 1, self.nc), 1)
        pxy = pxy.sigmoid() * 2 - 0.5
        pwh = (pwh.sigmoid() * 2) ** 2 * anchors
        iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox, CIoU=True).squeeze(-1)
        box_loss = (1.0 - iou).mean()
        cls_loss = torch.zeros((), device=pred.device)
        if self.nc > 1:  # a single class is carried by objectness alone
            target = torch.full_like(pcls, self.cn)
            target[torch.arange(len(tcls), device=pred.device), tcls] = self.cp
            cls_loss = self.BCEcls(pcls, target)
        return box_loss, iou, cls_loss

    def _write_objectness(
        self, tobj: torch.Tensor, index: tuple[torch.Tensor, ...], iou: torch.Tensor
    ) -> None:
        if self.sort_obj_iou:
            order = iou.argsort()
            index, iou = tuple(i[order] for i in index), iou[order]
        if self.gr < 1:
            iou = (1.0 - self.gr) + self.gr * iou
        tobj[index] = iou

    def _check_inputs(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> None:
        if len(preds) != self.nl:
            raise ValueError(f"ComputeLoss: expected {self.nl} prediction maps, got {len(preds)}")
        for level, pred in enumerate(preds):
            if pred.ndim != 5 or pred.shape[1] != self.na or pred.shape[4] != self.nc + 5:
                raise ValueError(
                    f"ComputeLoss: level {level} predictions have shape {tuple(pred.shape)}, expected "
                    f"(B, {self.na}, ny, nx, {self.nc + 5})"
                )
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(
                f"ComputeLoss: targets must be (M, 6) [image, class, x, y, w, h], got {tuple(targets.shape)}"
            )
        if self.nc > 1 and len(targets):
            classes = targets[:, 1]
            if bool((classes < 0).any() or (classes >= self.nc).any()):
                bad = int(((classes < 0) | (classes >= self.nc)).nonzero()[0, 0])
                raise ValueError(
                    f"ComputeLoss: target row {bad} has class {classes[bad].item():g}, "
                    f"outside [0, {self.nc - 1}]"
                )

    def build_targets(
        self, preds: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
        """Assign targets to (level, anchor, cell) triples, YOLOv5's way.

        A target goes to every anchor of a level whose width and height ratios to it are both below
        anchor_t (either way round), in its own cell and in the neighbour cells on the sides of the
        cell half its centre lies in: left if x mod 1 < 0.5, up if y mod 1 < 0.5, right/down
        likewise from the far edge. A side is skipped when the centre is within 1 cell of that
        image edge, so at most two neighbours are added (none on a cell's exact middle).

        Returns, per level (n = number of assignments at that level):
          tcls     (n,) long class ids
          tbox     (n, 4) [x, y, w, h] in cells: xy relative to the assigned cell's corner (in
                   [-0.5, 1.5]), wh the target's size
          indices  (image (n,), anchor (n,), gj (n,), gi (n,)) long, clamped to the grid
          anchors  (n, 2) the assigned anchors in cells
        """
        targets = targets.to(self.device, dtype=torch.float32)
        offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=self.device, dtype=torch.float32) * NEIGHBOUR_REACH
        tcls, tbox, indices, anch = [], [], [], []
        for level, pred in enumerate(preds):
            ny, nx = pred.shape[2], pred.shape[3]
            anchors = self.anchors[level].float()
            grid_targets = self._to_grid(targets, nx, ny)  # (M, 6) in cells
            matched = self._match_anchors(grid_targets, anchors)  # (n, 7) with the anchor index last
            matched, shift = self._add_neighbours(matched, offsets, nx, ny)
            image_class, gxy, gwh, anchor = matched.split((2, 2, 2, 1), 1)
            image, cls = image_class.long().T
            anchor = anchor.long().view(-1)
            gij = (gxy - shift).long()  # truncation = floor for the non-negative values here
            gij[:, 0].clamp_(0, nx - 1)
            gij[:, 1].clamp_(0, ny - 1)
            indices.append((image, anchor, gij[:, 1], gij[:, 0]))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(anchors[anchor])
            tcls.append(cls)
        return tcls, tbox, indices, anch

    @staticmethod
    def _to_grid(targets: torch.Tensor, nx: int, ny: int) -> torch.Tensor:
        scale = targets.new_tensor([1, 1, nx, ny, nx, ny])
        return targets * scale

    def _match_anchors(self, grid_targets: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(M, 6) targets x (na, 2) anchors -> (n, 7) matched rows, anchor-major, anchor index appended."""
        na, nt = anchors.shape[0], grid_targets.shape[0]
        anchor_index = torch.arange(na, device=self.device, dtype=torch.float32).view(na, 1, 1)
        anchor_index = anchor_index.expand(na, nt, 1)
        rows = torch.cat((grid_targets.expand(na, nt, 6), anchor_index), 2)  # (na, M, 7)
        if nt == 0:
            return rows.reshape(0, 7)
        ratio = grid_targets[None, :, 4:6] / anchors[:, None]  # (na, M, 2)
        worst = torch.max(ratio, 1 / ratio).max(2)[0]
        return rows[worst < self.hyp["anchor_t"]]

    @staticmethod
    def _add_neighbours(
        matched: torch.Tensor, offsets: torch.Tensor, nx: int, ny: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeat each matched row for its own cell and its two nearest neighbour cells.

        Returns the rows (offset-major: all own cells, then left, up, right, down) and the matching
        (k, 2) xy shifts to subtract from the centre before flooring to a cell index.
        """
        if matched.shape[0] == 0:
            return matched, matched.new_zeros(0, 2)
        gxy = matched[:, 2:4]
        gxy_inverse = matched.new_tensor([nx, ny]) - gxy
        left, up = ((gxy % 1 < NEIGHBOUR_REACH) & (gxy > 1)).T
        right, down = ((gxy_inverse % 1 < NEIGHBOUR_REACH) & (gxy_inverse > 1)).T
        keep = torch.stack((torch.ones_like(left), left, up, right, down))  # (5, n)
        rows = matched.expand(5, -1, -1)[keep]
        shifts = offsets[:, None].expand(-1, matched.shape[0], -1)[keep]
        return rows, shifts
