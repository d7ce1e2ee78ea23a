"""non_max_suppression against a plain greedy reference written here, plus its edge cases."""

from __future__ import annotations

import pytest
import torch

from utils.nms import non_max_suppression


def _iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def reference_nms(prediction, conf_thres, iou_thres, classes=None, agnostic=False, multi_label=False,
                  max_det=300, max_nms=30000):  # fmt: skip
    """Straightforward YOLOv5 NMS: per box, per class, greedy keep in falling score order."""
    nc = prediction.shape[2] - 5
    output = []
    for image in prediction.double().tolist():
        candidates = []  # (score, cls, [x1, y1, x2, y2])
        for x, y, w, h, obj, *cls_scores in image:
            if obj <= conf_thres:
                continue
            box = [x - w / 2, y - h / 2, x + w / 2, y + h / 2]
            scores = [obj * s for s in cls_scores]
            if multi_label and nc > 1:
                picked = [c for c in range(nc) if scores[c] > conf_thres]
            else:
                best = max(range(nc), key=lambda c: scores[c])
                picked = [best] if scores[best] > conf_thres else []
            candidates += [(scores[c], c, box) for c in picked if classes is None or c in classes]
        candidates.sort(key=lambda cand: -cand[0])
        kept = []
        for score, cls, box in candidates[:max_nms]:
            overlaps = [_iou(box, k[2]) > iou_thres for k in kept if agnostic or k[1] == cls]
            if not any(overlaps):
                kept.append((score, cls, box))
        output.append(torch.tensor([[*b, s, c] for s, c, b in kept[:max_det]]).reshape(-1, 6))
    return output


def random_prediction(seed: int, batch: int = 2, boxes: int = 150, nc: int = 4) -> torch.Tensor:
    """Crowded random boxes so that suppression really happens: centres in 0..200, sizes 10..80 px."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, boxes, 2, generator=g) * 200
    wh = 10 + torch.rand(batch, boxes, 2, generator=g) * 70
    scores = torch.rand(batch, boxes, 1 + nc, generator=g)
    return torch.cat((xy, wh, scores), 2)


def assert_same(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference):
        assert mine.shape == theirs.shape, (mine.shape, theirs.shape)
        torch.testing.assert_close(mine, theirs.float(), rtol=0, atol=1e-4)


MODES = [
    dict(),
    dict(multi_label=True),
    dict(agnostic=True),
    dict(multi_label=True, agnostic=True),
    dict(classes=[1, 3]),
    dict(max_det=5),
    dict(multi_label=True, max_nms=40),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()) or "default")
def test_matches_reference(seed, mode):
    prediction = random_prediction(seed)
    ours = non_max_suppression(prediction, conf_thres=0.2, iou_thres=0.45, **mode)
    assert_same(ours, reference_nms(prediction, 0.2, 0.45, **mode))
    assert any(len(o) for o in ours)


def test_modes_really_differ():
    """Guards the reference comparison: each mode changes the answer on this input."""
    prediction = random_prediction(5)
    default = non_max_suppression(prediction, 0.2, 0.45)[0]
    assert len(non_max_suppression(prediction, 0.2, 0.45, multi_label=True)[0]) > len(default)
    assert len(non_max_suppression(prediction, 0.2, 0.45, agnostic=True)[0]) < len(default)
    assert set(non_max_suppression(prediction, 0.2, 0.45, classes=[2])[0][:, 5].tolist()) == {2.0}
    assert len(non_max_suppression(prediction, 0.2, 0.45, max_det=3)[0]) == 3


def test_output_layout_and_order():
    prediction = torch.tensor([[[50.0, 50.0, 20.0, 10.0, 0.9, 0.2, 0.8],
                                [52.0, 50.0, 20.0, 10.0, 0.7, 0.1, 0.9],  # overlaps the first, same class
                                [150.0, 80.0, 40.0, 40.0, 0.95, 0.7, 0.3]]])  # fmt: skip
    (out,) = non_max_suppression(prediction, conf_thres=0.25, iou_thres=0.45)
    expected = torch.tensor([[40.0, 45.0, 60.0, 55.0, 0.9 * 0.8, 1.0],  # score 0.72 beats 0.7 * 0.9
                             [130.0, 60.0, 170.0, 100.0, 0.95 * 0.7, 0.0]])  # fmt: skip
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input(dtype):
    prediction = random_prediction(3).to(dtype)
    ours = non_max_suppression(prediction, 0.2, 0.45)
    assert all(o.dtype == torch.float32 for o in ours)
    assert_same(ours, non_max_suppression(prediction.float(), 0.2, 0.45))


def test_empty_inputs():
    empty = non_max_suppression(torch.zeros(3, 0, 8))
    assert [tuple(o.shape) for o in empty] == [(0, 6)] * 3
    below = torch.rand(2, 50, 8) * 0.1  # every objectness below conf_thres
    assert [tuple(o.shape) for o in non_max_suppression(below, conf_thres=0.25)] == [(0, 6), (0, 6)]
    for mode in MODES:
        assert [tuple(o.shape) for o in non_max_suppression(below, **mode)] == [(0, 6), (0, 6)]


def test_accepts_inference_tuple():
    prediction = random_prediction(4)
    raw_maps = [torch.zeros(1)]
    assert_same(non_max_suppression((prediction, raw_maps), 0.2), non_max_suppression(prediction, 0.2))


def test_single_class_ignores_multi_label():
    prediction = random_prediction(6, nc=1)
    assert_same(non_max_suppression(prediction, 0.2, multi_label=True), non_max_suppression(prediction, 0.2))


def test_labels_are_appended_as_certain_boxes():
    prediction = torch.zeros(2, 4, 8)  # nothing predicted
    labels = [torch.tensor([[2.0, 100.0, 100.0, 20.0, 30.0]]), torch.zeros(0, 5)]
    out = non_max_suppression(prediction, labels=labels)
    torch.testing.assert_close(out[0], torch.tensor([[90.0, 85.0, 110.0, 115.0, 1.0, 2.0]]))
    assert out[1].shape == (0, 6)
    with pytest.raises(ValueError, match="label class 5"):
        non_max_suppression(prediction, labels=[torch.tensor([[5.0, 1, 1, 1, 1]]), torch.zeros(0, 5)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(conf_thres=1.5), "conf_thres=1.5"),
        (dict(conf_thres=-0.1), "conf_thres=-0.1"),
        (dict(iou_thres=2.0), "iou_thres=2.0"),
        (dict(max_det=0), "max_det=0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        non_max_suppression(torch.zeros(1, 3, 7), **kwargs)


def test_bad_prediction_shape():
    with pytest.raises(ValueError, match=r"\(batch, boxes, 5 \+ nc\)"):
        non_max_suppression(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="nc >= 1"):
        non_max_suppression(torch.zeros(1, 3, 5))
