"""Format import/export: VOC -> YOLO -> COCO and COCO -> YOLO -> COCO round trips, ids, pycocotools."""

from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pytest
import yaml
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.convert import coco_image_id, coco_to_yolo, main, voc_to_yolo, yolo_to_coco
from tests.data_fixtures import draw_boxes, write_sample

VOC_IMAGES = {  # id: (width, height, [(name, xmin, ymin, xmax, ymax, difficult)])
    "img_a": (120, 80, [("cat", 11, 6, 50, 40, 0), ("dog", 61, 21, 120, 80, 0)]),  # dog touches the border
    "img_b": (100, 100, [("dog", 1, 1, 30, 30, 0), ("cat", 40, 40, 40, 60, 0), ("bird", 5, 50, 20, 90, 0)]),
    "img_c": (90, 60, [("cat", 20, 10, 70, 50, 1)]),  # only a difficult object: a background
    "img_d": (64, 64, []),
}
SPLITS = {"train": ["img_a", "img_b"], "val": ["img_c", "img_d"], "test": ["img_a"]}


def _voc_xml(image_id: str, width: int, height: int, objects) -> str:
    parts = [f"<annotation><filename>{image_id}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]  # fmt: skip
    for name, x1, y1, x2, y2, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


@pytest.fixture()
def voc_dir(tmp_path):
    src = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (src / sub).mkdir(parents=True)
    for image_id, (w, h, objects) in VOC_IMAGES.items():
        (src / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, w, h, objects))
        cv2.imwrite(str(src / "JPEGImages" / f"{image_id}.jpg"), np.full((h, w, 3), 90, np.uint8))
    for split, ids in SPLITS.items():
        (src / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return src


def test_voc_to_yolo_writes_labels_yaml_and_counts(voc_dir, tmp_path, caplog):
    out = tmp_path / "out"
    report = voc_to_yolo(voc_dir, out, names=["cat", "dog"])
    cfg = yaml.safe_load((out / "dataset.yaml").read_text())
    splits = {"train": "images/train", "val": "images/val", "test": "images/test"}
    assert cfg == {**splits, "names": ["cat", "dog"]}
    assert report.images == {"train": 2, "val": 2, "test": 1}
    assert report.counts == {"train": [1, 2], "val": [0, 0], "test": [1, 1]}
    assert report.skipped == 2  # the degenerate cat and the bird (not in names)
    assert "degenerate box" in caplog.text and "'bird' skipped: not one of the names" in caplog.text
    assert "train" in str(report) and "cat" in str(report)
    rows = np.loadtxt(out / "labels" / "train" / "img_a.txt", ndmin=2)
    # cat: pixels 11..50 (1-based inclusive) -> edges 10..50; dog reaches the right and bottom edges
    expected = [[0, 30 / 120, 22.5 / 80, 40 / 120, 35 / 80], [1, 90 / 120, 50 / 80, 60 / 120, 60 / 80]]
    np.testing.assert_allclose(rows, expected, atol=1e-6)
    assert not (out / "labels" / "val" / "img_c.txt").exists()  # difficult only: background
    assert (out / "images" / "val" / "img_c.jpg").is_symlink()


def test_voc_to_yolo_to_coco_gives_back_the_original_boxes(voc_dir, tmp_path):
    out = tmp_path / "out"
    voc_to_yolo(voc_dir, out, keep_difficult=True)  # names found: bird, cat, dog
    gt = json.loads(yolo_to_coco(out / "dataset.yaml", "train", tmp_path / "gt.json").read_text())
    names = [c["name"] for c in gt["categories"]]
    assert names == ["bird", "cat", "dog"] and [c["id"] for c in gt["categories"]] == [0, 1, 2]
    files = {im["id"]: im["file_name"] for im in gt["images"]}
    assert sorted(files.values()) == ["img_a.jpg", "img_b.jpg"]
    assert {coco_image_id(f) for f in files.values()} == set(files)
    got = sorted((files[a["image_id"]][:-4], names[a["category_id"]], *a["bbox"]) for a in gt["annotations"])
    expected = sorted(
        (i, name, x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1)
        for i in SPLITS["train"] for name, x1, y1, x2, y2, _ in VOC_IMAGES[i][2] if x2 > x1
    )  # fmt: skip
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    np.testing.assert_allclose([g[2:] for g in got], [e[2:] for e in expected], atol=0.01)
    assert gt["info"]["description"] and gt["licenses"] == []
    assert all(a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=0.01) for a in gt["annotations"])


def _coco_json(path):
    data = {
        "images": [
            {"id": 7, "file_name": "000000000007.jpg", "width": 100, "height": 50},
            {"id": 12, "file_name": "000000000012.jpg", "width": 60, "height": 80},
            {"id": 30, "file_name": "000000000030.jpg", "width": 40, "height": 40},  # no annotations
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10.5, 5.0, 20.0, 30.25], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 9, "bbox": [80.0, 20.0, 40.0, 10.0]},  # clipped
            {"id": 3, "image_id": 12, "category_id": 1, "bbox": [0.0, 0.0, 60.0, 80.0], "iscrowd": 0},
            {"id": 4, "image_id": 12, "category_id": 1, "bbox": [5.0, 5.0, 10.0, 10.0], "iscrowd": 1},
            {"id": 5, "image_id": 12, "category_id": 3, "bbox": [70.0, 5.0, 10.0, 10.0]},  # outside
        ],
        "categories": [{"id": 9, "name": "kite"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    path.write_text(json.dumps(data))
    return data


def test_coco_to_yolo_to_coco_round_trip(tmp_path, caplog):
    json_file = tmp_path / "annotations" / "instances_val2017.json"
    json_file.parent.mkdir()
    original = _coco_json(json_file)
    images = tmp_path / "val2017"
    images.mkdir()
    for im in original["images"]:
        cv2.imwrite(str(images / im["file_name"]), np.zeros((im["height"], im["width"], 3), np.uint8))
    out = tmp_path / "coco"
    report = coco_to_yolo(json_file, images, out)
    assert report.names == ["person", "car", "kite"]  # ascending category id
    assert report.images == {"val2017": 3} and report.counts == {"val2017": [1, 1, 1]}
    assert report.skipped == 1 and "empty box" in caplog.text
    cfg = yaml.safe_load((out / "dataset.yaml").read_text())
    assert cfg["val"] == "images/val2017" and "train" not in cfg
    cfg["train"] = cfg["val"]  # a dataset YAML needs both
    (out / "dataset.yaml").write_text(yaml.safe_dump(cfg))
    gt = json.loads(yolo_to_coco(out / "dataset.yaml", "val", tmp_path / "gt.json").read_text())
    assert sorted(im["id"] for im in gt["images"]) == [7, 12, 30]  # numeric stems keep COCO's ids
    names = [c["name"] for c in gt["categories"]]
    boxes = sorted((a["image_id"], names[a["category_id"]], *a["bbox"]) for a in gt["annotations"])
    expected = [(7, "car", 10.5, 5.0, 20.0, 30.25), (7, "kite", 80.0, 20.0, 20.0, 10.0)]
    expected.append((12, "person", 0, 0, 60, 80))  # the crowd box is left out
    assert [b[:2] for b in boxes] == [e[:2] for e in expected]
    np.testing.assert_allclose([b[2:] for b in boxes], [e[2:] for e in expected], atol=0.01)


def test_ground_truth_json_scores_perfectly_against_itself_in_pycocotools(voc_dir, tmp_path):
    out = tmp_path / "out"
    voc_to_yolo(voc_dir, out)
    gt_file = yolo_to_coco(out / "dataset.yaml", "train", tmp_path / "gt.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        predictions = [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt.dataset["annotations"]
        ]
        evaluator = COCOeval(gt, gt.loadRes(predictions), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # mAP@0.5:0.95


def test_coco_image_id_rule():
    assert coco_image_id("/data/val2017/000000397133.jpg") == 397133
    hashed = coco_image_id("/a/BloodImage_00001.jpg")
    assert 2**30 <= hashed < 2**31
    assert hashed == coco_image_id("other/place/BloodImage_00001.png")  # the stem decides
    assert hashed != coco_image_id("/a/BloodImage_00002.jpg")


def test_same_stem_twice_is_an_error(tmp_path):
    img = draw_boxes(32, 32, [(2, 2, 20, 20)], [0])
    write_sample(tmp_path / "a", "val", "same.png", img, "0 0.5 0.5 0.5 0.5\n")
    write_sample(tmp_path / "b", "val", "same.png", img, "0 0.5 0.5 0.5 0.5\n")
    folders = [str(tmp_path / d / "images" / "val") for d in "ab"]
    data = {"path": str(tmp_path), "train": folders, "val": folders, "names": ["x"]}
    with pytest.raises(ValueError, match="same COCO image id"):
        yolo_to_coco(data, "val", tmp_path / "gt.json")


def test_command_line(voc_dir, tmp_path, capsys):
    assert main(["voc", str(voc_dir), str(tmp_path / "out"), "--names", "cat", "dog", "bird", "--copy"]) == 0
    printed = capsys.readouterr().out
    assert "images" in printed and "bird" in printed and "dataset YAML" in printed
    assert not (tmp_path / "out" / "images" / "train" / "img_a.jpg").is_symlink()
    data_yaml = str(tmp_path / "out" / "dataset.yaml")
    assert main(["yolo2coco", data_yaml, str(tmp_path / "gt.json"), "--split", "test"]) == 0
    assert len(json.loads((tmp_path / "gt.json").read_text())["images"]) == 1
