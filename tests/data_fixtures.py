"""Helpers for the data tests: tiny datasets of solid rectangles whose pixels are the ground truth.

Boxes are (x1, y1, x2, y2) in pixel edges: the rectangle fills columns x1..x2-1 and rows y1..y2-1.
Each class has its own saturated colour on a dark background, so after any geometric augmentation
the extent of a class's colour around a label shows where the object really is.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from utils.boxes import xywhn2xyxy

BACKGROUND = (30, 30, 30)
PALETTE = (  # BGR, far from each other, from the background and from the grey padding (114)
    (0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0),
    (255, 255, 255), (0, 140, 255), (255, 140, 0), (140, 0, 255), (0, 255, 140), (255, 0, 140),
)  # fmt: skip


def draw_boxes(width: int, height: int, boxes: list[tuple[int, ...]], classes: list[int]) -> np.ndarray:
    """BGR image with each box filled in its class colour."""
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for (x1, y1, x2, y2), cls in zip(boxes, classes):
        img[y1:y2, x1:x2] = PALETTE[cls]
    return img


def yolo_rows(boxes, classes, width: int, height: int) -> str:
    """Label file text for pixel boxes."""
    lines = []
    for (x1, y1, x2, y2), cls in zip(boxes, classes):
        xc, yc = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"{cls} {xc:.6f} {yc:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return "\n".join(lines) + "\n"


def write_sample(root: Path, split: str, name: str, img: np.ndarray | bytes | None, label: str | None):
    """root/images/<split>/<name> (an array is encoded by the suffix, bytes written as they are) and
    root/labels/<split>/<stem>.txt (not written when label is None). Returns the image path."""
    im_path = root / "images" / split / name
    im_path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(img, np.ndarray):
        assert cv2.imwrite(str(im_path), img)
    elif img is not None:
        im_path.write_bytes(img)
    if label is not None:
        lb_path = root / "labels" / split / f"{Path(name).stem}.txt"
        lb_path.parent.mkdir(parents=True, exist_ok=True)
        lb_path.write_text(label)
    return im_path


def rect_dataset(root: Path, split: str = "train", n_images: int = 4, size=(160, 120), seed: int = 0) -> Path:
    """n_images PNGs with 3 rectangles each, every rectangle in a class used nowhere else in its image.

    Returns the images folder. Rectangles are 16 px to min(48, short side / 3), fully inside the
    image, not touching (so three always fit).
    """
    rng = np.random.default_rng(seed)
    width, height = size
    for k in range(n_images):
        classes = [int(c) for c in rng.choice(len(PALETTE), size=3, replace=False)]
        boxes, largest = [], min(48, min(width, height) // 3)
        while len(boxes) < len(classes):  # apart by 4 px: a hidden part would not be on the pixels
            bw, bh = (int(v) for v in rng.integers(16, largest + 1, 2))
            x1, y1 = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
            box = (x1, y1, x1 + bw, y1 + bh)
            if all(_apart(box, other, 4) for other in boxes):
                boxes.append(box)
        write_sample(root, split, f"im{k}.png", draw_boxes(width, height, boxes, classes),
                     yolo_rows(boxes, classes, width, height))  # fmt: skip
    return root / "images" / split


def _apart(a, b, gap: int) -> bool:
    return a[0] >= b[2] + gap or b[0] >= a[2] + gap or a[1] >= b[3] + gap or b[1] >= a[3] + gap


def colour_extent(img_bgr: np.ndarray, cls: int, region: tuple[int, int, int, int]) -> tuple[int, ...] | None:
    """Pixel-edge box of the pixels of class cls's colour inside region (x1, y1, x2, y2), or None."""
    x1, y1, x2, y2 = region
    patch = img_bgr[y1:y2, x1:x2].astype(int)
    mask = (np.abs(patch - np.array(PALETTE[cls])) < 60).all(-1)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return x1 + xs.min(), y1 + ys.min(), x1 + xs.max() + 1, y1 + ys.max() + 1


def assert_boxes_on_pixels(img_bgr: np.ndarray, labels_xyxy: np.ndarray, tol: float = 2.0) -> None:
    """Every label [cls, x1, y1, x2, y2] (pixels) matches the extent of its colour within tol px.

    A box clipped by the image border after a rotation/shear/perspective only has to enclose its
    pixels: YOLOv5 boxes a warped box by its four corners and then clips, so a corner outside the
    image can widen the box beyond the visible part (exact only with polygon labels).
    """
    h, w = img_bgr.shape[:2]
    for cls, *box in np.asarray(labels_xyxy, dtype=float):
        margin = int(tol) + 2
        region = (max(int(box[0]) - margin, 0), max(int(box[1]) - margin, 0),
                  min(int(np.ceil(box[2])) + margin, w), min(int(np.ceil(box[3])) + margin, h))  # fmt: skip
        extent = np.array(colour_extent(img_bgr, int(cls), region) or [np.nan] * 4, dtype=float)
        assert not np.isnan(extent).any(), f"no pixels of class {int(cls)} under box {box}"
        message = f"class {int(cls)}: box {np.round(box, 1)} vs pixels {extent}"
        touches_border = box[0] <= 0.5 or box[1] <= 0.5 or box[2] >= w - 0.5 or box[3] >= h - 0.5
        if touches_border:
            low, high = np.array(box[:2]) - tol, np.array(box[2:]) + tol
            assert (extent[:2] >= low).all() and (extent[2:] <= high).all(), message
        else:
            assert np.allclose(extent, box, atol=tol), message


def sample_to_bgr_and_boxes(img_chw_rgb, labels_out) -> tuple[np.ndarray, np.ndarray]:
    """A dataset item's (3, H, W) RGB tensor and (n, 6) normalised labels -> BGR image, [cls, xyxy px]."""
    img = np.ascontiguousarray(img_chw_rgb.numpy().transpose(1, 2, 0)[..., ::-1])
    labels = labels_out.numpy()[:, 1:].astype(np.float64)
    boxes = xywhn2xyxy(labels[:, 1:], img.shape[1], img.shape[0]) if len(labels) else np.zeros((0, 4))
    return img, np.concatenate([labels[:, :1], boxes], 1)


def no_augment_hyp(**overrides) -> dict:
    """Augmentation hyperparameters that change nothing, with the given ones switched on."""
    hyp = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.0, scale=0.0, shear=0.0,
               perspective=0.0, flipud=0.0, fliplr=0.0, mosaic=0.0, mixup=0.0, copy_paste=0.0)  # fmt: skip
    hyp.update(overrides)
    return hyp
