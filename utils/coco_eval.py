"""COCO-format detection results and their evaluation with pycocotools.

Result entries follow the COCO results layout: ``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}`` with the box's top-left corner and size in pixels of the original image.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch

from utils.boxes import xyxy2xywh

JsonSource = Union[str, Path, dict, list]


def coco80_to_coco91_class() -> list[int]:
    """COCO category ids (1..90, with gaps) of the 80 contiguous training classes, by class index."""
    missing = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids the 2014/2017 annotations never use
    return [i for i in range(1, 91) if i not in missing]


def _category_id(class_map: Sequence[int] | Mapping[int, int] | None, cls: int) -> int:
    if class_map is None:
        return cls
    try:
        return int(class_map[cls])
    except (IndexError, KeyError):
        raise ValueError(f"predictions_to_coco: class {cls} has no entry in class_map") from None


def predictions_to_coco(
    predictions: Sequence[torch.Tensor],
    image_ids: Sequence[int | str],
    class_map: Sequence[int] | Mapping[int, int] | None = None,
) -> list[dict]:
    """Detections per image -> COCO result dictionaries.

    Args:
        predictions: one (n, 6) tensor [x1, y1, x2, y2, conf, cls] per image, in pixels of the
            original image (after scale_boxes).
        image_ids: the COCO image id of each image (as in the ground-truth JSON).
        class_map: class index -> category id (a list such as coco80_to_coco91_class(), or a dict);
            None keeps the class index as the id.

    Returns a list of {"image_id", "category_id", "bbox": [x, y, w, h] rounded to 3 decimals,
    "score" rounded to 5 decimals}.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(
            f"predictions_to_coco: {len(predictions)} prediction tensors for {len(image_ids)} image ids"
        )
    results = []
    for image_id, detections in zip(image_ids, predictions):
        if detections.dim() != 2 or (len(detections) and detections.shape[1] < 6):
            raise ValueError(
                f"predictions_to_coco: image {image_id}: expected (n, 6) [x1, y1, x2, y2, conf, cls], "
                f"got {tuple(detections.shape)}"
            )
        boxes = xyxy2xywh(detections[:, :4].float())
        boxes[:, :2] -= boxes[:, 2:] / 2  # centre -> top-left corner
        for row, box in zip(detections.tolist(), boxes.tolist()):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": _category_id(class_map, int(row[5])),
                    "bbox": [round(v, 3) for v in box],
                    "score": round(row[4], 5),
                }
            )
    return results


def _load_json(source: JsonSource, what: str) -> Any:
    if isinstance(source, (dict, list)):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"evaluate_coco: {what} file {path} does not exist")
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"evaluate_coco: {what} file {path} is not valid JSON ({error})") from None


def _ground_truth(gt_json: JsonSource):
    """A pycocotools COCO object; fills 'area' (w*h) and 'iscrowd' (0) where a GT entry lacks them."""
    from pycocotools.coco import COCO

    dataset = _load_json(gt_json, "ground-truth")
    if not isinstance(dataset, dict):
        raise ValueError("evaluate_coco: the ground truth must be a COCO dictionary, not a list")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"evaluate_coco: the ground truth has no '{key}' key")
    dataset = dict(dataset, annotations=[dict(a) for a in dataset["annotations"]])
    for index, ann in enumerate(dataset["annotations"]):
        if "bbox" not in ann or len(ann["bbox"]) != 4:
            raise ValueError(f"evaluate_coco: ground-truth annotation {index} has no 4-value 'bbox'")
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", index + 1)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _check_predictions(predictions: Any, coco) -> list[dict]:
    if not isinstance(predictions, list):
        raise ValueError("evaluate_coco: predictions must be a JSON list of result dictionaries")
    if not predictions:
        raise ValueError(
            "evaluate_coco: the prediction list is empty (no detections above conf_thres), "
            "nothing for pycocotools to evaluate"
        )
    image_ids, category_ids = set(coco.getImgIds()), set(coco.getCatIds())
    for index, result in enumerate(predictions):
        missing = {"image_id", "category_id", "bbox", "score"} - set(result)
        if missing:
            raise ValueError(f"evaluate_coco: prediction {index} lacks {sorted(missing)}")
        if result["image_id"] not in image_ids:
            raise ValueError(f"evaluate_coco: prediction {index} has image_id {result['image_id']!r}, "
                             "which is not in the ground truth")  # fmt: skip
        if result["category_id"] not in category_ids:
            raise ValueError(
                f"evaluate_coco: prediction {index} has category_id {result['category_id']}, "
                "not a ground-truth category (on COCO, map classes with coco80_to_coco91_class())"
            )
    return [dict(r) for r in predictions]  # loadRes adds keys; keep the caller's list untouched


def evaluate_coco(
    gt_json: JsonSource,
    pred_json_or_list: JsonSource,
    image_ids: Sequence[int | str] | None = None,
) -> dict:
    """Evaluate detections with pycocotools (bbox, IoU 0.50:0.95, area 'all', maxDets 100).

    Args:
        gt_json: ground-truth annotations, a path to a COCO JSON or the loaded dictionary.
        pred_json_or_list: the results, a path to a JSON list or the list from predictions_to_coco.
        image_ids: evaluate only these images (e.g. the ones validated); default all GT images.

    Returns {"map50_95", "map50", "stats" (pycocotools' 12 numbers), "summary" (its printed table)}.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = _ground_truth(gt_json)
    predictions = _check_predictions(_load_json(pred_json_or_list, "prediction"), coco_gt)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_dt = coco_gt.loadRes(predictions)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    return {"map50_95": stats[0], "map50": stats[1], "stats": stats, "summary": summary.getvalue()}
