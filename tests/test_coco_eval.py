"""COCO result conversion, pycocotools evaluation, and agreement of our mAP with pycocotools'."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils.coco_eval import coco80_to_coco91_class, evaluate_coco, predictions_to_coco
from utils.metrics import ap_per_class, match_predictions

IMAGE_W, IMAGE_H = 640, 480


def test_coco80_to_coco91():
    ids = coco80_to_coco91_class()
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90
    assert ids[11] == 13 and ids[24] == 27 and ids[79] == 90  # stop sign, backpack, toothbrush
    assert ids == sorted(set(ids))
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)


def test_predictions_to_coco_layout():
    predictions = [torch.tensor([[10.0, 20.0, 40.0, 60.0, 0.123456789, 2.0]]), torch.zeros(0, 6)]
    results = predictions_to_coco(predictions, [42, 7], coco80_to_coco91_class())
    assert results == [{"image_id": 42, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.12346}]
    assert predictions_to_coco(predictions, ["a", "b"])[0]["category_id"] == 2  # no map: identity
    with pytest.raises(ValueError, match="class 2 has no entry"):
        predictions_to_coco(predictions, [1, 2], [1, 2])
    with pytest.raises(ValueError, match="2 prediction tensors for 1 image ids"):
        predictions_to_coco(predictions, [1])


def make_dataset(seed: int = 0, images: int = 80, nc: int = 3):
    """Generated GT (labels per image, [cls, x1, y1, x2, y2] pixels) and imperfect detections.

    Each object is found with probability 0.85 as a jittered box (jitter up to 15 % of its size,
    right class 90 % of the time), sometimes found twice; each image also gets 0-3 boxes where
    nothing is. Scores loosely follow box quality so AP lands between the extremes.
    """
    rng = np.random.default_rng(seed)
    labels, detections = [], []
    for _ in range(images):
        count = rng.integers(1, 9)
        wh = rng.uniform(20, 200, (count, 2))
        xy = rng.uniform(0, 1, (count, 2)) * ([IMAGE_W, IMAGE_H] - wh)
        gt = np.concatenate((rng.integers(0, nc, (count, 1)), xy, xy + wh), 1)
        rows = []
        for cls, x1, y1, x2, y2 in gt:
            for _copy in range(1 + (rng.random() < 0.15)):
                if rng.random() > 0.85:
                    continue
                size = np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1])
                jitter = rng.uniform(-0.15, 0.15, 4) * size
                label = cls if rng.random() < 0.9 else rng.integers(0, nc)
                score = np.clip(1 - np.abs(jitter / size).mean() * 4 + rng.normal(0, 0.15), 0.01, 1)
                rows.append([*(np.array([x1, y1, x2, y2]) + jitter), score, label])
        for _ in range(rng.integers(0, 4)):
            x1, y1 = rng.uniform(0, [IMAGE_W - 60, IMAGE_H - 60])
            rows.append([x1, y1, x1 + rng.uniform(20, 60), y1 + rng.uniform(20, 60), rng.uniform(0, 0.6),
                         rng.integers(0, nc)])  # fmt: skip
        rows = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
        detections.append(rows[rows[:, 4].argsort(descending=True)])  # NMS output order
        labels.append(torch.tensor(gt, dtype=torch.float32))
    return labels, detections


def ground_truth_json(labels: list[torch.Tensor]) -> dict:
    """The COCO annotation layout, as pycocotools reads it (ids from 1, bbox [x, y, w, h])."""
    images, annotations = [], []
    for image_id, image_labels in enumerate(labels, 1):
        images.append({"id": image_id, "width": IMAGE_W, "height": IMAGE_H, "file_name": f"{image_id}.jpg"})
        for cls, x1, y1, x2, y2 in image_labels.tolist():
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})  # fmt: skip
    categories = [{"id": c, "name": f"class{c}"} for c in range(3)]
    return {"images": images, "annotations": annotations, "categories": categories}


def our_map(labels, detections) -> tuple[float, float]:
    iouv = torch.linspace(0.5, 0.95, 10)
    correct = [match_predictions(d, lb, iouv) for d, lb in zip(detections, labels)]
    ap = ap_per_class(
        torch.cat(correct).numpy(),
        torch.cat(detections)[:, 4].numpy(),
        torch.cat(detections)[:, 5].numpy(),
        torch.cat(labels)[:, 0].numpy(),
    )[5]
    return float(ap[:, 0].mean()), float(ap.mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_our_map_agrees_with_pycocotools(seed, tmp_path):
    labels, detections = make_dataset(seed)
    assert sum(len(lb) for lb in labels) >= 300 and sum(len(d) for d in detections) >= 300
    gt_file, pred_file = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_file.write_text(json.dumps(ground_truth_json(labels)))
    pred_file.write_text(json.dumps(predictions_to_coco(detections, list(range(1, len(labels) + 1)))))
    coco = evaluate_coco(gt_file, pred_file)
    map50, map50_95 = our_map(labels, detections)
    assert 0.3 < map50_95 < 0.9  # a non-trivial case, far from 0 and 1
    # Same matches, same 101-point rule, area range 'all' and <= 100 boxes per image (COCO's maxDets),
    # so what is left is the matching order: we keep each detection's best-IoU label and let the
    # more confident detection win a shared label; pycocotools lets a detection whose best label
    # is taken fall back to its next label. Only crowded same-class boxes can tell the two apart.
    assert abs(coco["map50_95"] - map50_95) <= 0.01, (coco["map50_95"], map50_95)
    assert abs(coco["map50"] - map50) <= 0.01, (coco["map50"], map50)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in coco["summary"]
    assert len(coco["stats"]) == 12


def test_perfect_predictions_give_one():
    labels, _ = make_dataset(2, images=10)
    perfect = [torch.cat((lb[:, 1:5], torch.ones(len(lb), 1), lb[:, :1]), 1) for lb in labels]
    gt = ground_truth_json(labels)
    coco = evaluate_coco(gt, predictions_to_coco(perfect, list(range(1, 11))))
    assert coco["map50_95"] == pytest.approx(1.0) and coco["map50"] == pytest.approx(1.0)
    assert our_map(labels, perfect) == pytest.approx((1.0, 1.0))


def test_restricting_to_some_images():
    labels, _ = make_dataset(3, images=4)
    gt = ground_truth_json(labels)
    first_only = [torch.cat((labels[0][:, 1:5], torch.ones(len(labels[0]), 1), labels[0][:, :1]), 1)]
    results = predictions_to_coco(first_only, [1])
    assert evaluate_coco(gt, results, image_ids=[1])["map50"] == pytest.approx(1.0)
    assert evaluate_coco(gt, results)["map50"] < 0.6  # the other three images' objects count as missed


def test_ground_truth_without_area_or_iscrowd():
    labels, _ = make_dataset(4, images=3)
    gt = ground_truth_json(labels)
    for annotation in gt["annotations"]:
        del annotation["area"], annotation["iscrowd"]
    perfect = [torch.cat((lb[:, 1:5], torch.ones(len(lb), 1), lb[:, :1]), 1) for lb in labels]
    assert evaluate_coco(gt, predictions_to_coco(perfect, [1, 2, 3]))["map50_95"] == pytest.approx(1.0)
    assert "area" not in gt["annotations"][0]  # the caller's dictionary is left as it was


def test_clear_errors(tmp_path):
    gt = ground_truth_json(make_dataset(5, images=2)[0])
    with pytest.raises(ValueError, match="prediction list is empty"):
        evaluate_coco(gt, [])
    with pytest.raises(ValueError, match="image_id 99"):
        evaluate_coco(gt, [{"image_id": 99, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="category_id 57"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 57, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco(tmp_path / "missing.json", [])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        evaluate_coco(broken, [])
    with pytest.raises(ValueError, match="no 'categories' key"):
        evaluate_coco({"images": [], "annotations": []}, [])
