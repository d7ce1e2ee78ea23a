"""Metrics on hand-built cases whose answers are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, ap_per_class, compute_ap, fitness, match_predictions

IOUV = torch.linspace(0.5, 0.95, 10)

# COCO samples the precision envelope at recall 0, 0.01, ..., 1 (101 points) and averages.
# Reaching recall 0.5 with precision 1 and nothing after: the 51 points 0..0.50 score 1 -> 51/101.
HALF_RECALL_AP = 51 / 101
# Recall 0.5 at precision 1, then recall 1 at precision 2/3: 51 points at 1, 50 points at 2/3.
TP_FP_TP_AP = (51 * 1.0 + 50 * 2 / 3) / 101


def _stats(detections: torch.Tensor, labels: torch.Tensor):
    """One image -> ap_per_class's inputs (tp, conf, pred_cls, target_cls)."""
    correct = match_predictions(detections, labels, IOUV)
    return correct.numpy(), detections[:, 4].numpy(), detections[:, 5].numpy(), labels[:, 0].numpy()


GT_TWO = torch.tensor([[0.0, 10, 10, 50, 50], [0.0, 100, 100, 160, 140]])


def test_compute_ap_hand_values():
    assert compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))[0] == pytest.approx(1.0)
    assert compute_ap(np.array([0.5]), np.array([1.0]))[0] == pytest.approx(HALF_RECALL_AP)
    ap, mpre, mrec = compute_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert ap == pytest.approx(TP_FP_TP_AP)
    np.testing.assert_allclose(mrec, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(mpre, [1, 1, 2 / 3, 2 / 3, 0])  # the envelope, sentinels included
    # a false positive ranked first: COCO uses the envelope (2/3 here), not a sentinel precision of 1
    assert compute_ap(np.array([0.0, 1.0]), np.array([0.0, 0.5]))[0] == pytest.approx(0.5)
    assert compute_ap(np.array([]), np.array([]))[0] == 0.0


def test_perfect_predictions_score_one():
    detections = torch.tensor([[10.0, 10, 50, 50, 0.9, 0], [100, 100, 160, 140, 0.8, 0]])
    tp, fp, p, r, f1, ap, classes = ap_per_class(*_stats(detections, GT_TWO))
    np.testing.assert_allclose(ap, np.ones((1, 10)))
    np.testing.assert_allclose([p[0], r[0], tp[0], fp[0]], [1.0, 1.0, 2, 0])
    assert f1[0] == pytest.approx(1.0)
    assert classes.tolist() == [0]


def test_one_missed_box_of_two():
    detections = torch.tensor([[10.0, 10, 50, 50, 0.9, 0]])
    tp, fp, p, r, f1, ap, _ = ap_per_class(*_stats(detections, GT_TWO))
    np.testing.assert_allclose(ap, np.full((1, 10), HALF_RECALL_AP))
    assert (p[0], r[0]) == pytest.approx((1.0, 0.5))
    assert f1[0] == pytest.approx(2 / 3)
    assert (tp[0], fp[0]) == (1, 0)


def test_duplicate_is_a_false_positive():
    detections = torch.tensor([[10.0, 10, 50, 50, 0.9, 0],
                               [11.0, 10, 50, 50, 0.8, 0],  # the same object again
                               [100, 100, 160, 140, 0.7, 0]])  # fmt: skip
    correct = match_predictions(detections, GT_TWO, IOUV)
    assert correct[:, 0].tolist() == [True, False, True]
    ap = ap_per_class(*_stats(detections, GT_TWO))[5]
    np.testing.assert_allclose(ap, np.full((1, 10), TP_FP_TP_AP))


def test_match_predictions_thresholds_and_classes():
    labels = torch.tensor([[1.0, 0, 0, 10, 10]])
    detections = torch.tensor([[0.0, 0, 10, 7.2, 0.9, 1],  # IoU 0.72 with the label
                               [0.0, 0, 10, 10, 0.8, 2]])  # perfect box, wrong class  # fmt: skip
    correct = match_predictions(detections, labels, IOUV)
    assert correct.dtype == torch.bool and correct.shape == (2, 10)
    assert correct[0].tolist() == [True] * 5 + [False] * 5  # 0.50 .. 0.70 pass, 0.75 .. 0.95 fail
    assert not correct[1].any()


def test_match_predictions_most_confident_wins_a_shared_label():
    labels = torch.tensor([[0.0, 0, 0, 10, 10]])
    detections = torch.tensor([[0.0, 0, 10, 9.2, 0.5, 0],   # IoU 0.92, less confident
                               [0.0, 0, 10, 5.7, 0.9, 0]])  # IoU 0.57, more confident  # fmt: skip
    correct = match_predictions(detections, labels, IOUV)
    assert correct[:, 0].tolist() == [False, True]  # at 0.50 both qualify: confidence decides
    assert correct[:, 1].tolist() == [False, True]  # at 0.55 likewise
    assert correct[:, 2].tolist() == [True, False]  # from 0.60 only the tight box qualifies
    assert correct[0].sum() == 7  # 0.60 .. 0.90


def test_empty_predictions():
    tp = np.zeros((0, 10), dtype=bool)
    targets = np.array([0, 0, 2])
    tp_count, fp_count, p, r, f1, ap, classes = ap_per_class(tp, np.zeros(0), np.zeros(0), targets)
    assert classes.tolist() == [0, 2]
    np.testing.assert_array_equal(ap, np.zeros((2, 10)))
    np.testing.assert_array_equal(np.stack([p, r, tp_count, fp_count]), np.zeros((4, 2)))
    assert match_predictions(torch.zeros(0, 6), GT_TWO, IOUV).shape == (0, 10)


def test_empty_ground_truth():
    detections = torch.tensor([[10.0, 10, 50, 50, 0.9, 0]])
    correct = match_predictions(detections, torch.zeros(0, 5), IOUV)
    assert correct.shape == (1, 10) and not correct.any()
    tp, fp, p, r, f1, ap, classes = ap_per_class(correct.numpy(), [0.9], [0.0], np.zeros(0))
    assert ap.shape == (0, 10) and p.shape == (0,) and classes.shape == (0,)


def test_predictions_of_a_class_without_ground_truth_are_ignored():
    detections = torch.tensor([[10.0, 10, 50, 50, 0.9, 0], [100, 100, 160, 140, 0.8, 0],
                               [0, 0, 5, 5, 0.95, 3]])  # class 3 has no ground truth  # fmt: skip
    tp, fp, p, r, f1, ap, classes = ap_per_class(*_stats(detections, GT_TWO))
    assert classes.tolist() == [0]
    np.testing.assert_allclose(ap, np.ones((1, 10)))


def test_ap_per_class_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one entry per prediction"):
        ap_per_class(np.zeros((3, 10)), np.zeros(2), np.zeros(3), np.zeros(1))


def test_match_predictions_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"labels must be \(n, 5\)"):
        match_predictions(torch.zeros(1, 6), torch.zeros(2, 4), IOUV)


def test_fitness_weights():
    np.testing.assert_allclose(fitness(np.array([[0.5, 0.5, 0.8, 0.6], [1, 1, 0, 0]])), [0.62, 0.0])
    np.testing.assert_allclose(fitness(np.array([0.0, 0.0, 1.0, 1.0, 0.3, 0.2, 0.1])), [1.0])


def test_confusion_matrix_small_case():
    labels = torch.tensor([[0.0, 0, 0, 10, 10],      # A: found with the right class
                           [1.0, 20, 20, 30, 30],    # B: found but called class 0
                           [1.0, 50, 50, 60, 60]])   # C: missed  # fmt: skip
    detections = torch.tensor([[0.0, 0, 10, 10, 0.9, 0],
                               [20.0, 20, 30, 30, 0.8, 0],
                               [80.0, 80, 90, 90, 0.7, 1],   # D: nothing there
                               [50.0, 50, 60, 60, 0.1, 1]])  # under conf: ignored  # fmt: skip
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    cm.process_batch(detections, labels)
    expected = np.array([[1, 1, 0],   # predicted 0: A (true 0), B (true 1)
                         [0, 0, 1],   # predicted 1: D (background)
                         [0, 1, 0]])  # background: C missed (true 1)  # fmt: skip
    np.testing.assert_array_equal(cm.matrix, expected)
    tp, fp = cm.tp_fp()
    np.testing.assert_array_equal(tp, [1, 0])
    np.testing.assert_array_equal(fp, [1, 1])


def test_confusion_matrix_without_detections_or_labels():
    cm = ConfusionMatrix(nc=3)
    cm.process_batch(None, torch.tensor([[2.0, 0, 0, 5, 5], [2.0, 9, 9, 15, 15]]))
    cm.process_batch(torch.tensor([[0.0, 0, 5, 5, 0.9, 1]]), torch.zeros(0, 5))  # a false alarm
    assert cm.matrix[3, 2] == 2 and cm.matrix[1, 3] == 1 and cm.matrix.sum() == 3
    with pytest.raises(ValueError, match="label class 7"):
        cm.process_batch(None, torch.tensor([[7.0, 0, 0, 1, 1]]))


def test_smooth_keeps_the_length_of_every_curve():
    """An even window made the curve one longer for 15-34 epochs, and plot_results crashed at the end."""
    import numpy as np

    from utils.metrics import smooth

    for n in range(1, 120):
        assert smooth(np.arange(n, dtype=float)).shape == (n,), n
