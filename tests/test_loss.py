"""ComputeLoss against hand-worked assignments and loss values (YOLOv5 semantics)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from utils.loss import ComputeLoss, FocalLoss, scale_loss_gains, smooth_BCE

HYP_FILE = Path(__file__).resolve().parents[1] / "configs" / "hyps" / "hyp.scratch-low.yaml"
STRIDES = (8.0, 16.0, 32.0)
# Anchors in grid cells (stride units), chosen so the hand-worked matches below are unambiguous.
ANCHORS = [
    [[0.5, 0.5], [2.0, 2.0], [8.0, 9.0]],  # stride 8, 8x8 grid on a 64 px image
    [[1.0, 1.0], [3.0, 1.0], [0.2, 0.2]],  # stride 16, 4x4 grid
    [[3.0, 3.0], [4.0, 4.0], [5.0, 5.0]],  # stride 32, 2x2 grid
]
IMAGE = 64
# Two boxes in image 0, at coordinates exact in binary so grid positions are exact.
#   box A: class 1, centre (19/64, 39/64), size 1/4 -> 16 px
#   box B: class 0, centre (3/64, 7/64), size 1/16 -> 4 px, near the top-left corner
TARGETS = torch.tensor([[0, 1, 19 / 64, 39 / 64, 0.25, 0.25], [0, 0, 3 / 64, 7 / 64, 1 / 16, 1 / 16]])


class FakeDetect(nn.Module):
    """Just the attributes ComputeLoss reads from YOLOv5's Detect."""

    def __init__(self, nc: int, anchors: list, strides: tuple):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors), len(anchors[0])
        self.register_buffer("anchors", torch.tensor(anchors))
        self.register_buffer("stride", torch.tensor(strides))
        self.weight = nn.Parameter(torch.zeros(1))


class FakeModel(nn.Module):
    def __init__(self, hyp: dict, nc: int = 2, anchors: list = ANCHORS, strides: tuple = STRIDES):
        super().__init__()
        self.model = nn.ModuleList([FakeDetect(nc, anchors, strides)])
        self.hyp = hyp


def base_hyp(**overrides) -> dict:
    hyp = yaml.safe_load(HYP_FILE.read_text())
    hyp.update(overrides)
    return hyp


def constant_preds(nc: int = 2, obj_logit: float = -2.0, cls_logits=(1.0, -1.0), batch: int = 1) -> list:
    """Predictions that decode to xy = 0.5 and wh = anchor in every cell, with fixed obj/cls logits."""
    preds = []
    for stride in STRIDES:
        n = int(IMAGE / stride)
        p = torch.zeros(batch, 3, n, n, nc + 5)
        p[..., 4] = obj_logit
        p[..., 5:] = torch.tensor(cls_logits[:nc])
        preds.append(p)
    return preds


def hand_ciou(pred: tuple, target: tuple, eps: float = 1e-7) -> float:
    """CIoU of two (x, y, w, h) boxes written out from the paper (arXiv:1911.08287)."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = pred, target
    ix = max(0.0, min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2))
    iy = max(0.0, min(y1 + h1 / 2, y2 + h2 / 2) - max(y1 - h1 / 2, y2 - h2 / 2))
    inter = ix * iy
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    cw = max(x1 + w1 / 2, x2 + w2 / 2) - min(x1 - w1 / 2, x2 - w2 / 2)
    ch = max(y1 + h1 / 2, y2 + h2 / 2) - min(y1 - h1 / 2, y2 - h2 / 2)
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v / (v - iou + 1 + eps)
    return iou - rho2 / (cw**2 + ch**2 + eps) - alpha * v


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def bce_logits(x: float, t: float) -> float:
    return softplus(x) - x * t


# (level, anchor, gj, gi, tx, ty, tw, th, class) worked out by hand; see the comments per line.
EXPECTED = {
    # stride 8: A is (2.375, 4.875) cells, size 2 -> anchor 1 (ratio 1); anchor 0 has ratio exactly 4
    # (not < 4), anchor 2 ratio 4.5. Neighbours: x frac .375 -> left; y: 8 - 4.875 = 3.125 -> down.
    (0, 1, 4, 2, 0.375, 0.875, 2.0, 2.0, 1),
    (0, 1, 4, 1, 1.375, 0.875, 2.0, 2.0, 1),  # left neighbour
    (0, 1, 5, 2, 0.375, -0.125, 2.0, 2.0, 1),  # down neighbour
    # stride 8: B is (0.375, 0.875), size 0.5 -> anchor 0 (ratio 1), anchor 1 ratio exactly 4.
    # Left/up need x, y > 1 (no); right: 7.625 frac .625 (no); down: 7.125 frac .125 -> yes.
    (0, 0, 0, 0, 0.375, 0.875, 0.5, 0.5, 0),
    (0, 0, 1, 0, 0.375, -0.125, 0.5, 0.5, 0),  # down neighbour
    # stride 16: A is (1.1875, 2.4375), size 1 -> anchors 0 (ratio 1) and 1 (ratio 3); left and up.
    (1, 0, 2, 1, 0.1875, 0.4375, 1.0, 1.0, 1),
    (1, 1, 2, 1, 0.1875, 0.4375, 1.0, 1.0, 1),
    (1, 0, 2, 0, 1.1875, 0.4375, 1.0, 1.0, 1),  # left
    (1, 1, 2, 0, 1.1875, 0.4375, 1.0, 1.0, 1),
    (1, 0, 1, 1, 0.1875, 1.4375, 1.0, 1.0, 1),  # up
    (1, 1, 1, 1, 0.1875, 1.4375, 1.0, 1.0, 1),
    # stride 16: B is (0.1875, 0.4375), size 0.25 -> only anchor 2 (0.2: ratio 1.25); no neighbour.
    (1, 2, 0, 0, 0.1875, 0.4375, 0.25, 0.25, 0),
    # stride 32: sizes 1 and 0.25 cells against anchors 3..5 -> ratios >= 6, nothing assigned.
}


def assignments(loss: ComputeLoss, preds: list) -> set:
    tcls, tbox, indices, anchors = loss.build_targets(preds, TARGETS)
    found = set()
    for level in range(3):
        image, anchor, gj, gi = indices[level]
        assert torch.equal(image, torch.zeros_like(image))
        assert torch.equal(anchors[level], torch.tensor(ANCHORS[level])[anchor])
        for k in range(len(anchor)):
            box = tuple(round(v, 6) for v in tbox[level][k].tolist())
            found.add((level, int(anchor[k]), int(gj[k]), int(gi[k]), *box, int(tcls[level][k])))
    return found


def test_build_targets_assigns_levels_anchors_and_neighbour_cells():
    loss = ComputeLoss(FakeModel(base_hyp()))
    found = assignments(loss, constant_preds())
    assert found == EXPECTED
    assert len(found) == 12  # no duplicate assignment either


def expected_losses(hyp: dict, obj_logit: float = -2.0, cls_logits=(1.0, -1.0), eps: float = 0.0) -> list:
    """[box, obj, cls] worked out from EXPECTED with plain Python, gains applied."""
    positive, negative = 1 - eps / 2, eps / 2
    balance, cells = (4.0, 1.0, 0.4), (3 * 8 * 8, 3 * 4 * 4, 3 * 2 * 2)
    box = obj = cls = 0.0
    for level in range(3):
        rows = [r for r in EXPECTED if r[0] == level]
        ious = [hand_ciou((0.5, 0.5, *ANCHORS[level][r[1]]), r[4:8]) for r in rows]
        if rows:
            box += sum(1 - i for i in ious) / len(rows)
            terms = [
                bce_logits(x, positive if c == r[8] else negative)
                for r in rows
                for c, x in enumerate(cls_logits)
            ]
            cls += sum(terms) / len(terms)
        # obj: every cell's BCE with target 0, except assigned cells whose target is the clamped IoU
        level_obj = cells[level] * bce_logits(obj_logit, 0.0)
        level_obj += sum(bce_logits(obj_logit, max(i, 0.0)) - bce_logits(obj_logit, 0.0) for i in ious)
        obj += balance[level] * level_obj / cells[level]
    return [box * hyp["box"], obj * hyp["obj"], cls * hyp["cls"]]


def test_loss_value_matches_hand_computation():
    hyp = base_hyp()
    loss, items = ComputeLoss(FakeModel(hyp))(constant_preds(), TARGETS)
    expected = expected_losses(hyp)
    assert items.shape == (3,)
    assert items.tolist() == pytest.approx(expected, rel=1e-5)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(sum(expected) * 1, rel=1e-5)  # * batch size 1


def test_loss_scales_with_batch_size_and_ignores_other_images_cells():
    hyp = base_hyp()
    preds = [p.expand(3, -1, -1, -1, -1).clone().requires_grad_() for p in constant_preds()]
    loss, items = ComputeLoss(FakeModel(hyp))(preds, TARGETS)
    single_loss, single_items = ComputeLoss(FakeModel(hyp))(constant_preds(), TARGETS)
    # box and cls only see assigned predictions; obj is a mean over all cells of all images
    assert items[0].item() == pytest.approx(single_items[0].item(), rel=1e-6)
    assert items[2].item() == pytest.approx(single_items[2].item(), rel=1e-6)
    assert loss.item() == pytest.approx(3 * items.sum().item(), rel=1e-6)
    loss.backward()
    grad = preds[0].grad
    # box channels get gradient only in the 5 assigned (image 0) stride-8 cells
    assert int((grad[..., :4].abs().sum(-1) > 0).sum()) == 5
    assert grad[1:, ..., :4].abs().sum() == 0


def test_label_smoothing_changes_class_targets():
    assert smooth_BCE(0.1) == pytest.approx((0.95, 0.05))
    hyp = base_hyp(label_smoothing=0.1)
    _, items = ComputeLoss(FakeModel(hyp))(constant_preds(), TARGETS)
    expected = expected_losses(hyp, eps=0.1)
    assert items.tolist() == pytest.approx(expected, rel=1e-5)
    _, plain = ComputeLoss(FakeModel(base_hyp()))(constant_preds(), TARGETS)
    assert items[2] != pytest.approx(plain[2].item(), rel=1e-3)
    assert items[:2].tolist() == pytest.approx(plain[:2].tolist(), rel=1e-6)


def test_focal_loss_formula_and_effect():
    pred, true = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.3])
    focal = FocalLoss(nn.BCEWithLogitsLoss(reduction="none"), gamma=1.5, alpha=0.25)
    expected = []
    for x, t in zip(pred.tolist(), true.tolist()):
        p = 1 / (1 + math.exp(-x))
        p_t = t * p + (1 - t) * (1 - p)
        alpha_t = t * 0.25 + (1 - t) * 0.75
        expected.append(bce_logits(x, t) * alpha_t * (1 - p_t) ** 1.5)
    assert focal(pred, true).tolist() == pytest.approx(expected, rel=1e-5)
    mean_focal = FocalLoss(nn.BCEWithLogitsLoss(), gamma=1.5)
    assert mean_focal(pred, true).item() == pytest.approx(sum(expected) / 3, rel=1e-5)

    # in ComputeLoss fl_gamma > 0 turns it on for obj and cls; box is untouched
    focal_loss = ComputeLoss(FakeModel(base_hyp(fl_gamma=1.5)))
    assert isinstance(focal_loss.BCEcls, FocalLoss) and isinstance(focal_loss.BCEobj, FocalLoss)
    _, with_focal = focal_loss(constant_preds(), TARGETS)
    _, plain = ComputeLoss(FakeModel(base_hyp()))(constant_preds(), TARGETS)
    assert with_focal[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert with_focal[1] < plain[1] and with_focal[2] < plain[2]


def test_no_targets_gives_zero_box_and_cls():
    hyp = base_hyp()
    empty = torch.zeros(0, 6)
    loss, items = ComputeLoss(FakeModel(hyp))(constant_preds(batch=2), empty)
    assert items[0] == 0 and items[2] == 0
    assert items[1].item() == pytest.approx(5.4 * bce_logits(-2.0, 0.0) * hyp["obj"], rel=1e-5)
    assert loss.item() == pytest.approx(2 * items[1].item(), rel=1e-6)
    tcls, tbox, indices, anchors = ComputeLoss(FakeModel(hyp)).build_targets(constant_preds(), empty)
    assert all(len(t) == 0 for t in tcls) and all(b.shape == (0, 4) for b in tbox)


def test_single_class_has_no_class_loss():
    hyp = base_hyp()
    targets = TARGETS.clone()
    targets[:, 1] = 0
    _, items = ComputeLoss(FakeModel(hyp, nc=1))(constant_preds(nc=1), targets)
    assert items[2] == 0 and items[0] > 0


def test_scale_loss_gains():
    hyp = base_hyp()
    scaled = scale_loss_gains(hyp, nl=3, nc=80, imgsz=640)
    assert (scaled["box"], scaled["cls"], scaled["obj"]) == pytest.approx((0.05, 0.5, 1.0))
    scaled = scale_loss_gains(hyp, nl=4, nc=4, imgsz=320)
    assert scaled["box"] == pytest.approx(0.05 * 3 / 4)
    assert scaled["cls"] == pytest.approx(0.5 * 4 / 80 * 3 / 4)
    assert scaled["obj"] == pytest.approx(1.0 * 0.25 * 3 / 4)
    assert hyp["box"] == 0.05  # the input is not modified
    assert scaled["lr0"] == hyp["lr0"]


def test_autobalance_keeps_stride16_level_at_one():
    loss = ComputeLoss(FakeModel(base_hyp()), autobalance=True)
    loss(constant_preds(), TARGETS)
    assert loss.balance[1] == 1.0
    assert loss.balance[0] != pytest.approx(4.0, abs=1e-9)


def test_anchor_t_controls_matching():
    # with anchor_t 4.5 the stride-8 anchor 2 (ratio 4.5 to box A) still fails, anchor 0 (ratio 4) now matches
    loss = ComputeLoss(FakeModel(base_hyp(anchor_t=4.5)))
    found = assignments(loss, constant_preds())
    level0_anchors_of_a = {r[1] for r in found if r[0] == 0 and r[-1] == 1}
    assert level0_anchors_of_a == {0, 1}


def test_bad_inputs_are_named():
    loss = ComputeLoss(FakeModel(base_hyp()))
    with pytest.raises(ValueError, match=r"target row 1 has class 5"):
        loss(constant_preds(), torch.tensor([[0, 1, 0.5, 0.5, 0.1, 0.1], [0, 5, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match=r"\(M, 6\)"):
        loss(constant_preds(), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="expected 3 prediction maps"):
        loss(constant_preds()[:2], TARGETS)
    with pytest.raises(ValueError, match=r"level 0 predictions have shape"):
        loss([torch.zeros(1, 3, 8, 8, 6)] + constant_preds()[1:], TARGETS)
    hyp = base_hyp()
    del hyp["anchor_t"]
    with pytest.raises(KeyError, match="anchor_t"):
        ComputeLoss(FakeModel(hyp))


def test_real_detection_model_forward():
    yolo = pytest.importorskip("models.yolo", reason="models/yolo.py not written yet")
    torch.manual_seed(0)
    model = yolo.DetectionModel("yolov5n.yaml", nc=3)
    detect = model.model[-1]
    model.hyp = scale_loss_gains(base_hyp(), nl=detect.nl, nc=3, imgsz=128)
    model.train()
    preds = model(torch.rand(2, 3, 128, 128))
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.3], [1, 2, 0.25, 0.7, 0.1, 0.1]])
    loss, items = ComputeLoss(model)(preds, targets)
    assert items.shape == (3,) and torch.isfinite(loss).all() and (items > 0).all()
    loss.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
