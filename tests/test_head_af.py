"""The anchor-free head DetectAF, its assigner and loss: hand-computed cases, training and every path
downstream (val and pycocotools, detect, TTA, ensembles, hub, exports, the INT8 gate, checkpoints)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine.backend import InferenceBackend
from engine.checkpoint import checkpoint_dict, load_checkpoint, load_detection_model, save_checkpoint
from models.heads import DetectAF
from models.yolo import Detect, DetectionModel
from tests.test_export import calibrate_batchnorm
from utils.boxes import bbox_iou
from utils.loss import ComputeLoss
from utils.loss_af import AnchorFreeLoss, build_criterion, distribution_focal_loss
from utils.tal import TaskAlignedAssigner

NAMES = ["a", "b", "c"]
SLOW = pytest.mark.slow


def af_model(nc: int = 3, cfg: str = "yolov5n-af.yaml", seed: int = 0) -> DetectionModel:
    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=nc)
    model.names = [str(i) for i in range(nc)] if nc != len(NAMES) else list(NAMES)
    return model


def af_checkpoint(folder, calibrated: bool = True):
    model = af_model()
    if calibrated:
        calibrate_batchnorm(model)
    return save_checkpoint(checkpoint_dict(model), folder / "af.pt")


# -- the assigner on hand-computed cases -------------------------------------------------------------------
def _square_around(cx: float, cy: float, side: float) -> list[float]:
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def test_assigner_picks_topk_by_alignment_and_normalises_the_scores():
    # gt0 = [0, 0, 10, 10] class 0, gt1 = [20, 0, 30, 10] class 1; predictions are squares concentric with
    # the box an anchor lies in, so CIoU = IoU = (side / 10)^2 exactly (same centre, same aspect ratio).
    points = torch.tensor([[2.0, 5], [5, 5], [8, 5], [25, 5], [15, 5], [28, 5]])
    sides = [9.0, 5.0, 8.0, 10.0, 4.0, 6.0]  # IoU 0.81, 0.25, 0.64 | 1.0, -, 0.36
    centres = [(5, 5)] * 3 + [(25, 5), (15, 5), (25, 5)]
    boxes = torch.tensor([_square_around(*c, s) for c, s in zip(centres, sides)])[None]
    scores = torch.zeros(1, 6, 2)
    scores[0, :3, 0] = torch.tensor([0.04, 0.81, 0.25])  # class-0 scores of the anchors inside gt0
    scores[0, 3:, 1] = torch.tensor([0.25, 0.9, 0.64])  # class-1 scores (anchor 4 lies in no box)
    gt_boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 0, 30, 10]]])
    result = TaskAlignedAssigner(topk=2)(scores, boxes, points, torch.tensor([[0, 1]]), gt_boxes,
                                         torch.tensor([[True, True]]))
    # metrics s^0.5 * IoU^6: gt0 -> anchors 0 (0.2 * 0.81^6), 2 (0.5 * 0.64^6), not 1 (0.9 * 0.25^6);
    # gt1 -> anchors 3 (0.5 * 1) and 5 (0.8 * 0.36^6); anchor 4 is inside no box
    m0, m2 = 0.2 * 0.81**6, 0.5 * 0.64**6
    m3, m5 = 0.5 * 1.0, 0.8 * 0.36**6
    assert result.foreground[0].tolist() == [True, False, True, True, False, True]
    assert result.gt_index[0, [0, 2, 3, 5]].tolist() == [0, 0, 1, 1]
    assert result.labels[0, [0, 2, 3, 5]].tolist() == [0, 0, 1, 1]
    assert torch.equal(result.boxes[0, 2], gt_boxes[0, 0]) and torch.equal(result.boxes[0, 5], gt_boxes[0, 1])
    # target = metric / best metric of its gt * best IoU of its gt (0.81 for gt0, 1.0 for gt1)
    expected = torch.zeros(6, 2)
    expected[0, 0], expected[2, 0] = 0.81, m2 / m0 * 0.81
    expected[3, 1], expected[5, 1] = 1.0, m5 / m3 * 1.0
    torch.testing.assert_close(result.scores[0], expected, atol=1e-5, rtol=1e-4)


def test_an_anchor_in_two_boxes_keeps_the_one_it_overlaps_most_and_padding_is_ignored():
    points = torch.tensor([[7.0, 5.0]])
    gt_boxes = torch.tensor([[[0.0, 0, 10, 10], [4, 0, 14, 10], [0, 0, 0, 0]]])  # third row: padding
    boxes = torch.tensor([[[4.0, 0, 14, 10]]])  # exactly gt1: IoU 1 with it, 60/140 with gt0
    scores = torch.full((1, 1, 3), 0.5)
    result = TaskAlignedAssigner(topk=10)(scores, boxes, points, torch.tensor([[2, 1, 0]]), gt_boxes,
                                          torch.tensor([[True, True, False]]))
    assert result.foreground.tolist() == [[True]]
    assert result.gt_index.tolist() == [[1]] and result.labels.tolist() == [[1]]
    torch.testing.assert_close(result.scores[0, 0], torch.tensor([0.0, 1.0, 0.0]))


def test_small_boxes_grow_to_min_side_for_the_candidate_test_only():
    # anchor centres of an 8-px grid, 3 x 3 cells; a 4 x 4 box around (12, 12) holds one centre
    xs = torch.tensor([4.0, 12.0, 20.0])
    points = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    gt_boxes = torch.tensor([[[10.0, 10, 14, 14]]])
    boxes = gt_boxes.expand(1, 9, 4).clone()  # every anchor predicts the box itself: IoU 1
    args = (torch.full((1, 9, 1), 0.5), boxes, points, torch.tensor([[0]]), gt_boxes, torch.tensor([[True]]))
    plain = TaskAlignedAssigner(topk=10)(*args)
    assert plain.foreground[0].nonzero().flatten().tolist() == [4]  # the centre (12, 12) only
    grown = TaskAlignedAssigner(topk=10, min_side=24.0)(*args)  # [0, 0, 24, 24]: all nine centres
    assert grown.foreground.all()
    assert torch.equal(grown.boxes[0], gt_boxes[0].expand(9, 4))  # targets keep the real box
    wide = torch.tensor([[[10.0, 10, 40, 14]]])  # only its short side grows: rows y=4..20, x>10
    wide_args = (args[0], wide.expand(1, 9, 4).clone(), points, args[3], wide, args[5])
    wide_result = TaskAlignedAssigner(topk=10, min_side=24.0)(*wide_args)
    assert wide_result.foreground[0].nonzero().flatten().tolist() == [1, 2, 4, 5, 7, 8]


def _assign_by_loops(scores, boxes, points, gt_labels, gt_boxes, gt_mask, topk, alpha=0.5, beta=6.0):
    """The assignment rules written out box by box: {(image, anchor): (box slot, class, target score)}."""
    taken = {}  # (b, n) -> [(iou, m, metric)]
    for b, m in gt_mask.nonzero().tolist():
        x1, y1, x2, y2 = gt_boxes[b, m].tolist()
        ranked = []
        for n, (x, y) in enumerate(points.tolist()):
            if min(x - x1, y - y1, x2 - x, y2 - y) > 1e-9:
                iou = max(bbox_iou(boxes[b, n], gt_boxes[b, m], xywh=False, CIoU=True).item(), 0.0)
                ranked.append((-(scores[b, n, gt_labels[b, m]].item() ** alpha * iou ** beta), n, iou))
        for neg_metric, n, iou in sorted(ranked)[:topk]:
            taken.setdefault((b, n), []).append((iou, m, -neg_metric))
    kept = {key: max(options, key=lambda o: (o[0], -o[1])) for key, options in taken.items()}
    best = {}  # (b, m) -> (best metric, best iou) over the anchors the box kept
    for (b, _), (iou, m, metric) in kept.items():
        old = best.get((b, m), (0.0, 0.0))
        best[b, m] = (max(old[0], metric), max(old[1], iou))
    def target(b, m, metric):  # relative: metric / best metric of the box x its best IoU
        return metric * best[b, m][1] / best[b, m][0] if best[b, m][0] else 0.0

    return {(b, n): (m, int(gt_labels[b, m]), target(b, m, metric))
            for (b, n), (_, m, metric) in kept.items()}


def test_assigner_matches_the_rules_written_as_loops_on_random_batches():
    g = torch.Generator().manual_seed(0)
    xs = torch.arange(8.0) * 8 + 4
    points = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    for trial in range(25):
        boxes_per_image, nc, topk = trial % 5, 3, 1 + trial % 12
        centres, sides = torch.rand(2, 64, 2, generator=g) * 64, torch.rand(2, 64, 2, generator=g) * 20 + 2
        boxes = torch.cat((centres - sides / 2, centres + sides / 2), -1)
        gt_centres = torch.rand(2, boxes_per_image, 2, generator=g) * 64
        gt_sides = torch.rand(2, boxes_per_image, 2, generator=g) * 30 + 4
        gt_boxes = torch.cat((gt_centres - gt_sides / 2, gt_centres + gt_sides / 2), -1)
        gt_labels = torch.randint(0, nc, (2, boxes_per_image), generator=g)
        gt_mask = torch.rand(2, boxes_per_image, generator=g) < 0.8
        scores = torch.rand(2, 64, nc, generator=g)
        result = TaskAlignedAssigner(topk=topk)(scores, boxes, points, gt_labels, gt_boxes, gt_mask)
        expected = _assign_by_loops(scores, boxes, points, gt_labels, gt_boxes, gt_mask, topk)
        assert sorted(map(tuple, result.foreground.nonzero().tolist())) == sorted(expected)
        for (b, n), (m, cls, score) in expected.items():
            assert (result.gt_index[b, n].item(), result.labels[b, n].item()) == (m, cls)
            assert torch.equal(result.boxes[b, n], gt_boxes[b, m])
            assert result.scores[b, n, cls].item() == pytest.approx(score, rel=1e-4, abs=1e-7)
        assert result.scores[~result.foreground].abs().sum() == 0


def test_a_box_nothing_aligns_with_yet_still_gets_targets():
    # a 16 px box, the one anchor inside it predicting a 160 px box: IoU 0.01, class score 1e-4, so the
    # alignment is 0.01 * 0.01^6 = 1e-14. YOLOv8 divides by (best alignment + 1e-9), which leaves this box
    # a target score of ~1e-7 (no box loss, no class target: small objects at the start of training never
    # learn); the relative normalisation gives its best anchor the box's best IoU, as for any other box.
    points = torch.tensor([[8.0, 8.0]])
    gt_boxes = torch.tensor([[[0.0, 0, 16, 16]]])
    boxes = torch.tensor([[[-72.0, -72, 88, 88]]])
    scores = torch.full((1, 1, 1), 1e-4)
    iou = bbox_iou(boxes[0, 0], gt_boxes[0, 0], xywh=False, CIoU=True).item()
    args = (scores, boxes, points, torch.tensor([[0]]), gt_boxes, torch.tensor([[True]]))
    assert TaskAlignedAssigner()(*args).scores[0, 0, 0].item() == pytest.approx(iou, rel=1e-5)
    assert TaskAlignedAssigner(eps=1e-9)(*args).scores[0, 0, 0].item() < 1e-4 * iou  # YOLOv8's floor


def test_af_min_side_is_read_in_strides_of_the_finest_level():
    model = af_model()
    model.hyp = {"af_min_side": 3.0}
    assert build_criterion(model).assigner.min_side == 3.0 * float(model.model[-1].stride.min())


def test_assigner_with_no_boxes_assigns_nothing():
    result = TaskAlignedAssigner()(torch.rand(2, 5, 3), torch.rand(2, 5, 4), torch.rand(5, 2),
                                   torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4),
                                   torch.zeros(2, 0, dtype=torch.bool))
    assert not result.foreground.any() and result.scores.abs().sum() == 0


# -- DFL and CIoU ---------------------------------------------------------------------------------------
def test_distribution_focal_loss_by_hand():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    loss = distribution_focal_loss(probs.log(), torch.tensor([1.25]))
    # 1.25 lies between bins 1 and 2: 0.75 x CE to bin 1 + 0.25 x CE to bin 2
    assert loss.item() == pytest.approx(0.75 * -math.log(0.2) + 0.25 * -math.log(0.3), rel=1e-6)
    # it is smallest for the two-bin distribution whose expectation is the target
    best = torch.tensor([[1e-6, 0.75, 0.25, 1e-6]]).log()
    assert distribution_focal_loss(best, torch.tensor([1.25])) < loss
    assert (best.softmax(-1) * torch.arange(4.0)).sum().item() == pytest.approx(1.25, abs=1e-4)


def test_box_losses_weight_positives_by_score_or_all_the_same():
    model = af_model().train()
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [0, 0, 0.3, 0.3, 0.2, 0.3]])
    preds = model(torch.rand(1, 3, 96, 96))
    by_power = {}
    for power in (1.0, 0.0):
        model.hyp = {"af_box_score_power": power, "af_box": 1.0}
        criterion = build_criterion(model)
        step = criterion.assign(preds, targets)
        fg = step.assigned.foreground
        iou = bbox_iou(step.pred_boxes[fg], step.assigned.boxes[fg] / step.strides[fg[0]], xywh=False,
                       CIoU=True).view(-1)
        scores = step.assigned.scores.sum(-1)[fg]
        by_power[power] = (criterion(preds, targets)[1][0].item(), iou, scores)
    loss, iou, scores = by_power[1.0]  # YOLOv8: weighted by the target scores, / their sum (at least 1)
    assert loss == pytest.approx(((1 - iou) * scores).sum().item() / max(scores.sum().item(), 1.0), rel=1e-5)
    loss, iou, _ = by_power[0.0]  # every positive the same: the mean of 1 - CIoU over the positives
    assert loss == pytest.approx((1 - iou).mean().item(), rel=1e-5)
    assert by_power[0.0][0] != pytest.approx(by_power[1.0][0], rel=1e-3)


def test_ciou_of_known_pairs():
    # same aspect ratio (v = 0): IoU 6/10, centres 1 apart, enclosing box 5 x 2 (diagonal^2 29)
    same_shape = bbox_iou(torch.tensor([0.0, 0, 4, 2]), torch.tensor([1.0, 0, 5, 2]), xywh=False, CIoU=True)
    assert same_shape.item() == pytest.approx(0.6 - 1 / 29, abs=1e-6)
    # 2x2 against 4x2 sharing a corner: IoU 1/2, rho^2 1, c^2 20, v = 4/pi^2 (atan 2 - atan 1)^2
    v = 4 / math.pi**2 * (math.atan(2) - math.atan(1)) ** 2
    alpha = v / (v - 0.5 + 1)
    other = bbox_iou(torch.tensor([0.0, 0, 2, 2]), torch.tensor([0.0, 0, 4, 2]), xywh=False, CIoU=True)
    assert other.item() == pytest.approx(0.5 - (1 / 20 + v * alpha), abs=1e-6)


# -- the head ----------------------------------------------------------------------------------------------
def test_eval_output_has_detects_layout_and_decodes_distances_by_hand():
    model = af_model().eval()
    x = torch.rand(2, 3, 160, 96)
    decoded, maps = model(x)
    cells = [(160 // s) * (96 // s) for s in (8, 16, 32)]
    assert isinstance(model.model[-1], DetectAF) and model.stride.tolist() == [8, 16, 32]
    assert decoded.shape == (2, sum(cells), 5 + 3)
    reference = af_model(cfg="yolov5n.yaml").eval()(x)[0]
    assert reference.shape[0] == 2 and reference.shape[2] == decoded.shape[2]  # Detect: 3 anchors per cell
    assert torch.all(decoded[..., 4] == 1) and decoded[..., 5:].min() >= 0 and decoded[..., 5:].max() <= 1
    assert [tuple(m.shape) for m in maps] == [(2, 64 + 3, 160 // s, 96 // s) for s in (8, 16, 32)]
    # put all the mass of each side on one bin: l=1, t=2, r=3, b=4 cells around every cell centre
    head = model.model[-1]
    hand = [torch.full((1, 67, 160 // s, 96 // s), -50.0) for s in (8, 16, 32)]
    for m in hand:
        for side, distance in enumerate((1, 2, 3, 4)):
            m[:, side * 16 + distance] = 50.0
    rows = head.decode(hand)[0]
    row = cells[0] + 2 * (96 // 16) + 5  # level 1 (stride 16), cell y=2, x=5: centre (5.5, 2.5) cells
    cx, cy = 5.5 + (3 - 1) / 2, 2.5 + (4 - 2) / 2
    torch.testing.assert_close(rows[row, :4], torch.tensor([cx * 16, cy * 16, 4 * 16, 6 * 16]))


def test_biases_follow_yolov8s_prior():
    head = af_model().model[-1]
    for box, cls, stride in zip(head.box_branch, head.cls_branch, (8, 16, 32)):
        assert torch.all(box[-1].bias == 1.0)
        torch.testing.assert_close(cls[-1].bias, torch.full((3,), math.log(5 / 3 / (640 / stride) ** 2)))
    # YOLOv8's branch widths for yolov5n's P3 width 64: box max(16, 64 / 4, 64) = 64, class max(64, 3) = 64
    assert head.box_branch[0][0].conv.out_channels == 64 and head.cls_branch[0][0].conv.out_channels == 64


def _yaml_with_head_args(tmp_path, args: str):
    """yolov5n-af.yaml with its DetectAF row's arguments replaced by `args` (YAML text)."""
    from utils.general import resolve_config

    text = resolve_config("yolov5n-af.yaml", "models").read_text()
    path = tmp_path / "head.yaml"
    path.write_text(text.replace("DetectAF, [nc]]", f"DetectAF, {args}]"))
    return str(path)


@pytest.mark.parametrize("kind, separable_convs, most_flops", [("dw", 2, 1.12), ("lite", 1, 1.08)])
def test_light_branches_are_depthwise_separable_lighter_and_keep_the_layout(tmp_path, kind, separable_convs,
                                                                            most_flops):
    from utils.torch_utils import count_flops

    full, light = af_model(), af_model(cfg=_yaml_with_head_args(tmp_path, f"[nc, 16, {kind}]"))
    head = light.model[-1]
    for branch in (*head.box_branch, *head.cls_branch):
        assert len(branch) == 2 * separable_convs + 1  # (depthwise, pointwise) pairs, then the output conv
        for depthwise, pointwise in zip(branch[0:-1:2], branch[1:-1:2]):
            depthwise, pointwise = depthwise.conv, pointwise.conv
            assert depthwise.groups == depthwise.in_channels and depthwise.kernel_size == (3, 3)
            assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
    assert head.box_branch[0][-1].out_channels == 64 and head.cls_branch[0][-1].out_channels == 3
    head_params = {m: sum(p.numel() for p in m.model[-1].parameters()) for m in (full, light)}
    assert head_params[light] < head_params[full] / 5
    # the whole model's cost: the full branches add about 70% to yolov5n, dw about 10%, lite about 6%
    base = count_flops(af_model(cfg="yolov5n.yaml"), 320)
    assert count_flops(full, 320) > 1.5 * base and count_flops(light, 320) < most_flops * base
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    before, after = _before_and_after_fuse(light, x)
    assert before.shape == (1, (12 * 16 + 6 * 8 + 3 * 4), 8)
    assert (after - before).abs().max() <= 1e-4 * max(1.0, before[..., :4].abs().max().item())


def test_unknown_branch_kind_names_the_row(tmp_path):
    from models.yolo import ModelConfigError

    with pytest.raises(ModelConfigError, match=r"row 24.*branches must be one of conv, dw, lite, got 'wide'"):
        DetectionModel(_yaml_with_head_args(tmp_path, "[nc, 16, wide]"))


def test_af_yamls_need_no_anchors_but_detect_yamls_still_do(tmp_path):
    import yaml

    from models.yolo import ModelConfigError, load_model_config

    assert "anchors" not in load_model_config("yolov5n-af.yaml")
    cfg = load_model_config("yolov5n.yaml")
    cfg.pop("anchors")
    with pytest.raises(ModelConfigError, match="missing the key 'anchors'"):
        DetectionModel(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**load_model_config("yolov5n-af.yaml"), "nc": 0}))
    with pytest.raises(ModelConfigError, match="'nc'"):
        DetectionModel(str(path))


def _before_and_after_fuse(model: DetectionModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded outputs of a BN-calibrated model before and after fuse() (the model stays fused)."""
    calibrate_batchnorm(model)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse()
        return before, model(x)[0]


def test_fuse_keeps_outputs_and_runs_rectangular_and_bf16():
    model = af_model()
    x = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(3))
    before, after = _before_and_after_fuse(model, x)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert (after - before).abs().max() <= 1e-4 * max(1.0, before[..., :4].abs().max().item())
    assert low.shape == before.shape and torch.isfinite(low).all()


def test_criterion_follows_the_head_and_reads_af_gains():
    anchor_based = af_model(cfg="yolov5n.yaml")
    anchor_based.hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0,
                        "fl_gamma": 0.0}
    assert type(build_criterion(anchor_based)) is ComputeLoss
    model = af_model()
    model.hyp = {"af_box": 2.0}
    criterion = build_criterion(model)
    assert type(criterion) is AnchorFreeLoss
    assert criterion.gains == {"af_box": 2.0, "af_cls": 0.5, "af_dfl": 1.5, "af_topk": 10.0,
                               "af_min_side": 0.0, "af_box_score_power": 0.0}
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    model.train()
    loss, items = criterion(model(torch.rand(2, 3, 96, 128)), targets)
    assert loss.shape == (1,) and items.shape == (3,) and torch.all(items > 0)
    assert loss.item() == pytest.approx(items.sum().item() * 2, rel=1e-5)
    with pytest.raises(ValueError, match="class outside"):
        criterion(model(torch.rand(2, 3, 96, 128)), torch.tensor([[0, 7, 0.5, 0.5, 0.1, 0.1]]))


def test_loss_falls_when_training_on_builtin_images(tiny_data):
    from data.config import check_dataset
    from data.loaders import create_dataloader
    from tests.data_fixtures import no_augment_hyp

    data = check_dataset(str(tiny_data))
    loader, _ = create_dataloader(data["train"], 128, 8, 32, hyp=no_augment_hyp(), augment=False, workers=0,
                                  names=data["names"])
    images, targets, _, _ = next(iter(loader))
    model = af_model(nc=data["nc"]).train()
    criterion = build_criterion(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss, items = criterion(model(images.float() / 255), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(items)
    first, last = losses[0], torch.stack(losses[-3:]).mean(0)
    assert last.sum() < 0.6 * first.sum(), (first, last)
    assert torch.all(last < first), (first, last)  # box, dfl and cls each fall


# -- the trainer, checkpoints and everything downstream ----------------------------------------------------
@pytest.fixture(scope="module")
def trained_af(tmp_path_factory, tiny_data):
    """yolov5n-af trained for 2 short epochs by the Trainer (autoanchor left on: it must skip itself)."""
    from engine.trainer import TrainOptions, Trainer
    from utils.general import resolve_config, yaml_load

    folder = tmp_path_factory.mktemp("af_train")
    hyp = yaml_load(resolve_config("hyp.scratch-low.yaml", "hyps"))
    options = TrainOptions(cfg="yolov5n-af.yaml", data=str(tiny_data), hyp=hyp, epochs=2, batch_size=16,
                           imgsz=96, workers=0, noplots=True, deterministic=True,
                           save_dir=str(folder / "run"))
    trainer = Trainer(options, torch.device("cpu"))
    trainer.run()
    return trainer, folder / "run"


def test_trainer_uses_the_af_loss_and_writes_loadable_checkpoints(trained_af, tiny_data):
    trainer, run = trained_af
    assert type(trainer.compute_loss) is AnchorFreeLoss
    assert torch.isfinite(trainer.mean_losses).all() and trainer.mean_losses.shape == (3,)
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # header and one row per epoch
    header = rows[0].split(",")  # the terms by their names: DetectAF's middle term is the DFL
    assert header[1:4] == ["train/box_loss", "train/dfl_loss", "train/cls_loss"]
    assert header[8:11] == ["val/box_loss", "val/dfl_loss", "val/cls_loss"]
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    assert "anchors" not in ckpt["yaml"] and ckpt["yaml"]["head"][-1][2] == "DetectAF"
    model = load_detection_model(run / "weights" / "last.pt", "cpu", fuse=True)
    assert isinstance(model.model[-1], DetectAF) and model.stride.tolist() == [8, 16, 32]


def test_assignment_report_counts_each_class_boxes_candidates_and_positives(trained_af, tiny_data,
                                                                            tiny_checkpoint):
    from data.config import check_dataset
    from data.loaders import create_dataloader
    from engine.assign_report import assignment_report

    _, run = trained_af
    weights = str(run / "weights" / "last.pt")
    plain = assignment_report(weights, str(tiny_data), imgsz=96, batch_size=8, batches=2)
    hyp = load_detection_model(weights, fuse=False).hyp
    loader, _ = create_dataloader(check_dataset(str(tiny_data))["train"], 96, 8, 32, hyp=hyp, augment=True,
                                  workers=0, shuffle=True, seed=0)
    seen = sum(len(targets) for _, targets, *_ in itertools.islice(loader, 2))  # the same two batches
    assert sum(entry.boxes for entry in plain.values()) == seen > 0
    names = load_detection_model(weights, fuse=False).names
    assert set(plain) <= set(names)
    for entry in plain.values():  # positives are candidates, at most af_topk (10) of them per box
        assert entry.positives <= min(entry.candidates, 10 * entry.boxes)
        assert 0 <= entry.without_positives <= entry.boxes
        assert 0 <= entry.best_iou <= entry.boxes - entry.without_positives
        assert 0 <= entry.target_score <= entry.positives
    assert sum(entry.best_iou for entry in plain.values()) > 0  # the trained model overlaps some boxes
    grown = assignment_report(weights, str(tiny_data), imgsz=96, batch_size=8, batches=2,
                              hyp={"af_min_side": 4.0})  # sides below 32 px grow to 32
    assert all(grown[name].candidates >= plain[name].candidates for name in plain)
    assert sum(e.candidates for e in grown.values()) > sum(e.candidates for e in plain.values())
    with pytest.raises(ValueError, match="for DetectAF models"):
        assignment_report(str(tiny_checkpoint), str(tiny_data), imgsz=96, batches=1)


@SLOW
def test_resume_of_an_af_run(trained_af, tiny_data, tmp_path):
    import shutil

    from engine.trainer import TrainOptions, Trainer

    trainer, run = trained_af
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    last = copy / "weights" / "last.pt"
    options = TrainOptions(**{**trainer.options.as_plain_dict(), "epochs": 3, "save_dir": str(copy),
                              "resume": True, "resume_path": str(last)})
    resumed = Trainer(options, torch.device("cpu"))
    resumed.run()
    assert resumed.start_epoch == 2 and load_checkpoint(last)["epoch"] == 2


def test_val_detect_tta_and_hub_run_with_the_af_head(trained_af, tiny_data, tmp_path):
    import hubconf
    import val
    from engine.detector import Detector

    _, run = trained_af
    weights = run / "weights" / "last.pt"
    results, _ = val.run(data=str(tiny_data), weights=str(weights), imgsz=96, batch_size=4, workers=0,
                         project=str(tmp_path), name="val", plots=False, conf_thres=0.001)
    assert 0 <= results.map <= 1
    backend = InferenceBackend(weights)
    x = torch.rand(1, 3, 96, 128)
    plain, augmented = backend(x), backend(x, augment=True)
    assert plain.shape[2] == augmented.shape[2] == 5 + 6 and augmented.shape[1] > plain.shape[1]
    detections = Detector(str(weights), conf=0.0001, imgsz=96)(torch.rand(3, 96, 128))
    assert len(detections) == 1
    assert isinstance(hubconf.yolov5n_af(classes=4, autoshape=False).model[-1], DetectAF)


def test_ensembles_refuse_mixing_head_kinds(tmp_path):
    af = af_checkpoint(tmp_path, calibrated=False)
    anchor = af_model(cfg="yolov5n.yaml")
    anchor_path = save_checkpoint(checkpoint_dict(anchor), tmp_path / "anchor.pt")
    with pytest.raises(ValueError, match="one head kind"):
        InferenceBackend([af, anchor_path])
    assert InferenceBackend([af, af])(torch.rand(1, 3, 64, 64)).shape[1] == 2 * (64 + 16 + 4)


@SLOW
def test_af_model_exports_to_onnx_and_openvino_verified(tmp_path):
    from engine.exporter import RELATIVE_TOLERANCE, export_and_verify

    weights = af_checkpoint(tmp_path)
    results = export_and_verify(weights, include=("torchscript", "onnx", "openvino"), imgsz=128, dynamic=True)
    for fmt in ("torchscript", "onnx", "openvino"):
        checks = results[fmt].checks
        assert checks and all(c.relative_diff <= RELATIVE_TOLERANCE for c in checks), fmt
    x = torch.rand(1, 3, 96, 160)
    reference = InferenceBackend(weights)(x)
    onnx = InferenceBackend(results["onnx"].path)(x)
    assert onnx.shape == reference.shape == (1, 12 * 20 + 6 * 10 + 3 * 5, 8)


@SLOW
def test_val_map_of_an_af_model_equals_pycocotools(tiny_data, tmp_path):
    """An AF model fitted to the val images (a real, imperfect mAP) validated by val.py --save-json."""
    import val
    from data.config import check_dataset
    from data.loaders import create_dataloader
    from tests.data_fixtures import no_augment_hyp

    data = check_dataset(str(tiny_data))
    loader, _ = create_dataloader(data["val"], 128, 12, 32, hyp=no_augment_hyp(), augment=False, workers=0,
                                  names=data["names"])
    images, targets, _, _ = next(iter(loader))
    images = images.float() / 255
    model = af_model(nc=data["nc"]).train()
    model.names = list(data["names"])
    criterion = build_criterion(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(35):
        loss, _ = criterion(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module in model.modules():  # running BN statistics of these images (35 steps leave them far off)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(images)
    weights = save_checkpoint(checkpoint_dict(model.eval()), tmp_path / "fitted.pt")
    results, _ = val.run(data=str(tiny_data), weights=str(weights), imgsz=128, batch_size=4, workers=0,
                         project=str(tmp_path), name="val", plots=False, save_json=True)
    assert 0.05 < results.map < 0.95, results.map
    assert abs(results.map - results.coco["map50_95"]) <= 0.01
    assert abs(results.map50 - results.coco["map50"]) <= 0.01
    # the INT8 gate (DetectAF kept float32 like Detect) validates the float and INT8 files of this model
    from engine.exporter import export_and_verify

    int8 = export_and_verify(weights, include=("onnx",), imgsz=128, int8=True, data=str(tiny_data), calib=16)
    metrics = int8["onnx_int8"].metrics
    assert int8["onnx_int8"].path.is_file() and metrics["map_float"] > 0.05
    assert metrics["drop"] <= 0.01 and metrics["map_float"] == pytest.approx(results.map, abs=0.02)


@SLOW
def test_nncf_quantises_the_af_branch_convs_and_keeps_the_output_convs_float(tmp_path):
    """OpenVINO INT8 (NNCF) of a DetectAF model: the branch convs run on int8 inputs (they are most of the
    head's cost), the output conv of each branch (`*_branch.i.2`, six) and the decoding after them do not."""
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import numpy as np

    from engine.exporter import export_and_verify
    from engine.quantize_openvino import quantize_openvino_ir

    weights = af_checkpoint(tmp_path)
    float_ir = export_and_verify(weights, include=("openvino",), imgsz=64)["openvino"].path
    batches = [np.random.default_rng(i).random((1, 3, 64, 64), dtype=np.float32) for i in range(2)]
    quantize_openvino_ir(next(float_ir.glob("*.xml")), tmp_path / "q.xml", batches, "/model.24/")
    ops = ov.Core().read_model(str(tmp_path / "q.xml")).get_ordered_ops()
    head_convs = {op.get_friendly_name(): any(op.input_value(i).get_node().get_type_name() == "FakeQuantize"
                                              for i in range(op.get_input_size()))
                  for op in ops if op.get_type_name() == "Convolution" and
                  op.get_friendly_name().startswith("/model.24/")}
    outputs = {name for name in head_convs if ".2/Conv/" in name}
    assert len(head_convs) == 18 and len(outputs) == 6
    assert not any(head_convs[name] for name in outputs)
    assert all(quantised for name, quantised in head_convs.items() if name not in outputs)
