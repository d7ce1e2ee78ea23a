"""Format import/export: Pascal-VOC XML -> YOLO, COCO JSON -> YOLO, YOLO -> COCO ground-truth JSON.

    python -m data.convert voc SRC OUT [--split-dir ImageSets/Main] [--names A B ...] [--suffix 2007]
    python -m data.convert coco JSON IMAGES OUT [--split val2017]
    python -m data.convert yolo2coco DATA_YAML --split val OUT.json

Imports write OUT/images/<split>/ (symlinks to the source images, or copies with --copy),
OUT/labels/<split>/*.txt (no file for an image without objects: a background), and
OUT/dataset.yaml without a `path` key (so the folder can be moved); converting several splits
into one OUT merges them into that YAML. A per-class count per split is printed.

Box conventions:
  VOC xmin..xmax are 1-based inclusive pixel indices, so the box covers pixel edges
  [xmin - 1, xmax] (xmax = width is the last column). COCO boxes are [x, y, w, h] in pixel edges,
  so a VOC box comes back from yolo2coco as [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1].
  Objects marked difficult are left out (as YOLOv5's VOC conversion does) unless --keep-difficult;
  COCO crowd annotations are left out.

COCO image ids written by yolo2coco: ``coco_image_id(path)`` -- the file stem as an integer when it
is all digits (COCO's own 000000397133.jpg -> 397133), else a stable hash of the stem in
[2**30, 2**31). val.py gets the same id for a prediction from the image path alone. Two images
with the same id (same stem in two folders) are an error. Category ids are the class indices.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from data.verify import IMG_FORMATS, image_size
from utils.files import atomic_write_text

LOGGER = logging.getLogger(f"vitdet.{__name__}")
SPLIT_FILES = ("train", "val", "test")


@dataclass
class ConversionReport:
    """What an import wrote: images and objects per class for each split, objects left out."""

    yaml_file: Path
    names: list[str]
    images: dict[str, int] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)
    skipped: int = 0

    def __str__(self) -> str:
        width = max(len(n) for n in [*self.names, "images", "total"]) + 2
        head = "split".ljust(12) + "".join(c.rjust(width) for c in ["images", *self.names, "total"])
        rows = [head]
        for split, counts in self.counts.items():
            cells = [self.images[split], *counts, sum(counts)]
            rows.append(split.ljust(12) + "".join(str(c).rjust(width) for c in cells))
        rows.append(f"{self.skipped} objects left out (see warnings); dataset YAML: {self.yaml_file}")
        return "\n".join(rows)


def _place_image(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def _write_label(path: Path, rows: list[tuple[int, float, float, float, float]]) -> None:
    """YOLO rows [cls, x, y, w, h] normalised; nothing is written for an image without objects."""
    if rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows))


def _yolo_row(cls: int, x1: float, y1: float, x2: float, y2: float, width: int, height: int):
    return cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height


def _split_key(split: str) -> list[str]:
    """Which YAML keys a split folder feeds: train*/val*/test*; 'all' (no split files) feeds both."""
    if split == "all":
        return ["train", "val"]
    for key in SPLIT_FILES:
        if split.startswith(key):
            return [key]
    return ["train" if "train" in split else "val"]


def update_dataset_yaml(out: Path, split: str, names: list[str]) -> Path:
    """Add images/<split> to OUT/dataset.yaml (created if absent); names must agree with it."""
    yaml_file = out / "dataset.yaml"
    cfg = yaml.safe_load(yaml_file.read_text()) if yaml_file.is_file() else {}
    if cfg.get("names", names) != names:
        raise ValueError(f"{yaml_file} has names {cfg['names']}, this conversion has {names}")
    folder = f"images/{split}"
    for key in _split_key(split):
        current = cfg.get(key)
        if current is None or current == folder:
            cfg[key] = folder
        else:
            listed = current if isinstance(current, list) else [current]
            cfg[key] = listed if folder in listed else [*listed, folder]
    cfg["names"] = names
    cfg = {k: cfg[k] for k in [*SPLIT_FILES, "names"] if k in cfg} | cfg  # YOLOv5's key order
    header = "# written by data.convert; no `path`: splits are relative to this file's folder\n"
    yaml_file.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return yaml_file


# ------------------------------------------------------------------------------------------- VOC
def _voc_splits(src: Path, split_dir: str | None) -> dict[str, list[str]]:
    """Split name -> image ids from SRC/<split_dir>/{train,val,test}.txt (trainval when no train)."""
    folder = src / split_dir if split_dir else None
    splits = {}
    if folder and folder.is_dir():
        for name in SPLIT_FILES:
            listed = folder / f"{name}.txt"
            if name == "train" and not listed.is_file():
                listed = folder / "trainval.txt"
            if listed.is_file():
                splits[name] = [line.split()[0] for line in listed.read_text().splitlines() if line.strip()]
    if not splits:
        LOGGER.warning(f"{src}: no split files in {folder}; all images go to one split for train and val")
        splits["all"] = sorted(p.stem for p in (src / "Annotations").glob("*.xml"))
    return splits


def _find_voc_image(src: Path, root: ET.Element, image_id: str) -> Path | None:
    name = root.findtext("filename") or ""
    candidates = [src / "JPEGImages" / name] if name else []
    candidates += [src / "JPEGImages" / f"{image_id}.{ext}" for ext in IMG_FORMATS]
    return next((c for c in candidates if c.is_file()), None)


def _voc_objects(xml_file: Path, root: ET.Element, keep_difficult: bool):
    """[(name, xmin, ymin, xmax, ymax)] as written, plus warnings for unusable objects."""
    objects, warnings = [], []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if not keep_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        try:
            box = [float(obj.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            warnings.append(f"{xml_file}: object {k} ({name}) skipped: missing or non-numeric bndbox")
            continue
        if box[2] <= box[0] or box[3] <= box[1]:
            warnings.append(f"{xml_file}: object {k} ({name}) skipped: degenerate box {box}")
            continue
        objects.append((name, *box))
    return objects, warnings


@dataclass
class VocImage:
    """One parsed VOC annotation: the image file, its (w, h) and objects (name, xmin, ymin, xmax, ymax)."""

    image: Path
    size: tuple[int, int]
    objects: list


def _read_voc(src: Path, image_id: str, keep_difficult: bool) -> tuple[VocImage | None, list[str]]:
    """(parsed annotation or None when the image cannot be used, warning lines)."""
    xml_file = src / "Annotations" / f"{image_id}.xml"
    if not xml_file.is_file():
        return None, [f"{xml_file}: listed in a split file but missing; image skipped"]
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as e:
        return None, [f"{xml_file}: not valid XML ({e}); image skipped"]
    image = _find_voc_image(src, root, image_id)
    if image is None:
        return None, [f"{xml_file}: image {root.findtext('filename')} not found in JPEGImages; skipped"]
    objects, warnings = _voc_objects(xml_file, root, keep_difficult)
    return VocImage(image, image_size(str(image)), objects), warnings


def _voc_rows(entry: VocImage, index: dict[str, int], where: str) -> tuple[list, int]:
    """YOLO rows of one image and the number of objects left out for an unknown class."""
    width, height = entry.size
    rows, unknown = [], 0
    for name, xmin, ymin, xmax, ymax in entry.objects:
        if name not in index:
            LOGGER.warning(f"{where}: object '{name}' skipped: not one of the names {list(index)}")
            unknown += 1
            continue
        x1, y1 = max(xmin - 1, 0), max(ymin - 1, 0)  # 1-based inclusive indices -> pixel edges
        x2, y2 = min(xmax, width), min(ymax, height)
        rows.append(_yolo_row(index[name], x1, y1, x2, y2, width, height))
    return rows, unknown


def voc_to_yolo(
    src: str | Path,
    out: str | Path,
    split_dir: str | None = "ImageSets/Main",
    names: list[str] | None = None,
    copy_images: bool = False,
    keep_difficult: bool = False,
    suffix: str = "",
) -> ConversionReport:
    """Pascal-VOC folder (Annotations/, JPEGImages/, <split_dir>/*.txt) -> YOLO dataset in OUT.

    names: class order (default: the sorted class names found); objects of other classes are
    left out with a warning. suffix is appended to split folder names (e.g. '2007' -> train2007).
    """
    src, out = Path(src), Path(out)
    splits = _voc_splits(src, split_dir)
    parsed, skipped = {}, 0
    for image_id in dict.fromkeys(i for ids in splits.values() for i in ids):
        parsed[image_id], warnings = _read_voc(src, image_id, keep_difficult)
        for line in warnings:
            LOGGER.warning(line)
        skipped += sum(" object " in line for line in warnings)
    if names is None:
        names = sorted({obj[0] for entry in parsed.values() if entry for obj in entry.objects})
    index = {n: i for i, n in enumerate(names)}
    report = ConversionReport(out / "dataset.yaml", list(names), skipped=skipped)
    for split, ids in splits.items():
        folder = f"{split}{suffix}"
        counts, n_images = [0] * len(names), 0
        for image_id in ids:
            entry = parsed[image_id]
            if entry is None:
                continue
            rows, unknown = _voc_rows(entry, index, f"{src}/Annotations/{image_id}.xml")
            report.skipped += unknown
            for row in rows:
                counts[row[0]] += 1
            _place_image(entry.image, out / "images" / folder / entry.image.name, copy_images)
            _write_label(out / "labels" / folder / f"{entry.image.stem}.txt", rows)
            n_images += 1
        report.images[folder], report.counts[folder] = n_images, counts
        update_dataset_yaml(out, folder, list(names))
    return report


# ------------------------------------------------------------------------------------------ COCO
def _load_coco(json_file: Path) -> dict:
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise KeyError(f"{json_file}: no '{key}' key; not a COCO instances file")
    return data


def _coco_rows(json_file: Path, image: dict, annotations: list, cat_index: dict, report: ConversionReport):
    width, height = image["width"], image["height"]
    rows = []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        if ann["category_id"] not in cat_index:
            where = f"{json_file}: annotation {ann.get('id')}"
            LOGGER.warning(f"{where} skipped: unknown category {ann['category_id']}")
            report.skipped += 1
            continue
        x, y, w, h = ann["bbox"]
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x2 <= x1 or y2 <= y1:
            where = f"{json_file}: annotation {ann.get('id')}"
            LOGGER.warning(f"{where} skipped: empty box {ann['bbox']} in a {width}x{height} image")
            report.skipped += 1
            continue
        rows.append(_yolo_row(cat_index[ann["category_id"]], x1, y1, x2, y2, width, height))
    return rows


def coco_to_yolo(
    json_file: str | Path,
    images_dir: str | Path,
    out: str | Path,
    split: str | None = None,
    copy_images: bool = False,
) -> ConversionReport:
    """COCO instances JSON + its image folder -> YOLO labels for one split in OUT.

    Classes are the categories in ascending id order (class index = position). split defaults to the
    JSON's stem without 'instances_' (instances_val2017.json -> val2017).
    """
    json_file, images_dir, out = Path(json_file), Path(images_dir), Path(out)
    data = _load_coco(json_file)
    split = split or json_file.stem.removeprefix("instances_")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in categories]
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    by_image = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    report = ConversionReport(out / "dataset.yaml", names, {split: 0}, {split: [0] * len(names)})
    seen = {}
    for image in sorted(data["images"], key=lambda im: im["id"]):
        src = images_dir / image["file_name"]
        if not src.is_file():
            LOGGER.warning(f"{json_file}: image {src} not found; skipped")
            continue
        if src.name in seen:
            raise ValueError(f"{json_file}: {src} and {seen[src.name]} share a file name in images/{split}")
        seen[src.name] = src
        rows = _coco_rows(json_file, image, by_image[image["id"]], cat_index, report)
        for row in rows:
            report.counts[split][row[0]] += 1
        _place_image(src, out / "images" / split / src.name, copy_images)
        _write_label(out / "labels" / split / f"{src.stem}.txt", rows)
        report.images[split] += 1
    update_dataset_yaml(out, split, names)
    return report


# ---------------------------------------------------------------------------------- YOLO -> COCO
def coco_image_id(path: str | Path) -> int:
    """Stable COCO image id of an image file (see the module docstring for the rule)."""
    stem = Path(path).stem
    if stem.isdigit():
        return int(stem)
    return 2**30 + int(hashlib.sha1(stem.encode()).hexdigest(), 16) % 2**30


def yolo_to_coco(data: str | Path | dict, split: str, out_json: str | Path) -> Path:
    """COCO ground-truth JSON (for pycocotools) of one split of a YOLO dataset; returns its path.

    The images and boxes are exactly what the dataset loader uses (verified and repaired labels).
    Boxes are [x, y, w, h] in original-image pixels; category_id = class index.
    """
    from data.config import check_dataset
    from data.verify import scan_dataset

    cfg = check_dataset(data)
    if not cfg.get(split):
        raise ValueError(f"dataset {cfg['yaml_file']} has no '{split}' split")
    scan = scan_dataset(cfg[split], nc=cfg["nc"], prefix=f"{split}: ")
    images, annotations, owners = [], [], {}
    for im_file, (w, h), labels in zip(scan.im_files, scan.shapes.tolist(), scan.labels):
        image_id = coco_image_id(im_file)
        if image_id in owners:
            raise ValueError(f"{im_file} and {owners[image_id]} get the same COCO image id {image_id}")
        owners[image_id] = im_file
        images.append({"id": image_id, "file_name": Path(im_file).name, "width": w, "height": h})
        for cls, x, y, bw, bh in labels.astype(np.float64).tolist():
            box = [round((x - bw / 2) * w, 3), round((y - bh / 2) * h, 3), round(bw * w, 3), round(bh * h, 3)]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls),
                "bbox": box, "area": round(box[2] * box[3], 3), "iscrowd": 0,
            })  # fmt: skip
    coco = {
        "info": {"description": f"'{split}' split of {cfg['yaml_file'] or cfg['path']}", "version": "1.0",
                 "contributor": "vitdet data.convert yolo2coco"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(cfg["names"])],
    }  # fmt: skip
    out_json = Path(out_json)
    atomic_write_text(out_json, json.dumps(coco))
    return out_json


# ------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    voc = sub.add_parser("voc", help="Pascal-VOC XML -> YOLO")
    voc.add_argument("src", type=Path)
    voc.add_argument("out", type=Path)
    voc.add_argument("--split-dir", default="ImageSets/Main", help="train/val/test.txt folder in SRC")
    voc.add_argument("--names", nargs="+", help="class order (default: sorted names found)")
    voc.add_argument("--suffix", default="", help="appended to split folders, e.g. 2007 -> train2007")
    voc.add_argument("--keep-difficult", action="store_true")
    voc.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    coco = sub.add_parser("coco", help="COCO instances JSON -> YOLO")
    coco.add_argument("json", type=Path)
    coco.add_argument("images", type=Path)
    coco.add_argument("out", type=Path)
    coco.add_argument("--split", help="split folder name (default: from the JSON name)")
    coco.add_argument("--copy", action="store_true")
    to_coco = sub.add_parser("yolo2coco", help="YOLO dataset split -> COCO ground-truth JSON")
    to_coco.add_argument("data", help="dataset YAML (path or name in configs/data)")
    to_coco.add_argument("out", type=Path)
    to_coco.add_argument("--split", default="val")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "voc":
        options = dict(copy_images=args.copy, keep_difficult=args.keep_difficult, suffix=args.suffix)
        print(voc_to_yolo(args.src, args.out, args.split_dir, args.names, **options))
    elif args.command == "coco":
        print(coco_to_yolo(args.json, args.images, args.out, args.split, args.copy))
    else:
        print(f"wrote {yolo_to_coco(args.data, args.split, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
