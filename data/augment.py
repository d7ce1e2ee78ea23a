"""Image augmentations for detection, with YOLOv5's semantics and hyperparameter names.

Conventions used throughout:
  images  -- (H, W, 3) uint8 numpy arrays in BGR order (as cv2 reads them)
  targets -- (n, 5) float arrays [cls, x1, y1, x2, y2] with corners in pixels of that image
  segments -- list of (K, 2) float arrays, polygon points in pixels, one per target row

Every random draw comes from a ``numpy.random.Generator`` passed as ``rng`` (a fresh unseeded one
when omitted), so a dataset that owns a seeded generator gets reproducible augmentation without any
global random state.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from utils.boxes import segment2box

PAD_COLOUR = (114, 114, 114)  # YOLOv5's grey for letterbox and warp borders


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


def letterbox(
    im: np.ndarray,
    new_shape: int | tuple[int, int] = (640, 640),
    color: tuple[int, int, int] = PAD_COLOUR,
    auto: bool = True,
    scaleFill: bool = False,  # noqa: N803 -- YOLOv5's keyword name
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping the aspect ratio, then pad to ``new_shape`` (height, width).

    auto: pad only up to the next multiple of ``stride`` (minimum rectangle) instead of the full shape.
    scaleFill: stretch to ``new_shape`` without padding (aspect ratio not kept).
    scaleup: allow enlarging; False only shrinks (better validation mAP).

    Returns (image, (ratio_w, ratio_h), (pad_w, pad_h)) with the padding of one side in pixels
    (may be a half pixel: the left/top side gets the rounded-down half).
    """
    shape = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    gain = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        gain = min(gain, 1.0)
    ratio = gain, gain
    new_unpadded = round(shape[1] * gain), round(shape[0] * gain)  # (w, h)
    pad_w, pad_h = new_shape[1] - new_unpadded[0], new_shape[0] - new_unpadded[1]
    if auto:
        pad_w, pad_h = np.mod(pad_w, stride), np.mod(pad_h, stride)
    elif scaleFill:
        pad_w, pad_h = 0.0, 0.0
        new_unpadded = (new_shape[1], new_shape[0])
        ratio = new_shape[1] / shape[1], new_shape[0] / shape[0]
    pad_w, pad_h = pad_w / 2, pad_h / 2
    if shape[::-1] != new_unpadded:
        im = cv2.resize(im, new_unpadded, interpolation=cv2.INTER_LINEAR)
    # the 0.1 nudge puts an odd pixel of padding on the bottom/right side
    top, bottom = round(pad_h - 0.1), round(pad_h + 0.1)
    left, right = round(pad_w - 0.1), round(pad_w + 0.1)
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (pad_w, pad_h)


def augment_hsv(
    im: np.ndarray,
    hgain: float = 0.5,
    sgain: float = 0.5,
    vgain: float = 0.5,
    rng: np.random.Generator | None = None,
) -> None:
    """Random hue/saturation/value gains, applied in place to a BGR uint8 image.

    Each gain is drawn uniformly from [1 - g, 1 + g]; hue wraps around OpenCV's 0..179 range.
    """
    if not (hgain or sgain or vgain):
        return
    gains = _rng(rng).uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    levels = np.arange(0, 256, dtype=gains.dtype)
    lut_hue = ((levels * gains[0]) % 180).astype(im.dtype)
    lut_sat = np.clip(levels * gains[1], 0, 255).astype(im.dtype)
    lut_val = np.clip(levels * gains[2], 0, 255).astype(im.dtype)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)


def box_candidates(
    box1: np.ndarray,
    box2: np.ndarray,
    wh_thr: float = 2,
    ar_thr: float = 100,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Which boxes survive an augmentation: (4, n) xyxy before (box1) and after (box2) -> (n,) bool.

    A box is kept when both sides exceed ``wh_thr`` pixels, its area is more than ``area_thr`` of
    the area before, and its aspect ratio is under ``ar_thr`` (YOLOv5's filter).
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def _perspective_matrix(
    im_shape: tuple[int, int],
    out_size: tuple[int, int],
    degrees: float,
    translate: float,
    scale: float,
    shear: float,
    perspective: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """3x3 matrix = translate @ shear @ rotate-scale @ perspective @ centre; also the scale drawn."""
    height, width = out_size
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -im_shape[1] / 2, -im_shape[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective, 2)
    rotate = np.eye(3)
    angle, gain = rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale)
    rotate[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=gain)
    shear_m = np.eye(3)
    shear_m[0, 1] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    shear_m[1, 0] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height
    return move @ shear_m @ rotate @ persp @ centre, gain


def _apply_matrix(points: np.ndarray, matrix: np.ndarray, perspective: bool) -> np.ndarray:
    """(K, 2) points -> (K, 2) points under a 3x3 homography."""
    xy = np.ones((len(points), 3))
    xy[:, :2] = points
    xy = xy @ matrix.T
    return xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]


def resample_segments(segments: list[np.ndarray], n: int = 1000) -> list[np.ndarray]:
    """Each closed (K, 2) polygon -> (n, 2) points evenly spaced along its outline (by index)."""
    out = []
    for seg in segments:
        closed = np.concatenate((seg, seg[:1]), axis=0)
        pos = np.linspace(0, len(closed) - 1, n)
        index = np.arange(len(closed))
        out.append(np.stack([np.interp(pos, index, closed[:, k]) for k in range(2)], axis=1))
    return out


def _warp_boxes(targets: np.ndarray, matrix: np.ndarray, perspective: bool, size: tuple[int, int]):
    """Enclosing xyxy boxes of the four warped corners of each box, clipped to size (h, w)."""
    n = len(targets)
    corners = targets[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)
    xy = _apply_matrix(corners, matrix, perspective).reshape(n, 8)
    xs, ys = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    boxes = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), axis=1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, size[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, size[0])
    return boxes


def random_perspective(
    im: np.ndarray,
    targets: np.ndarray = (),
    segments: list[np.ndarray] = (),
    degrees: float = 10,
    translate: float = 0.1,
    scale: float = 0.1,
    shear: float = 10,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation, scale, shear, translation and perspective of an image and its targets.

    border (y, x): output size is the input size plus twice the border (negative for the mosaic's
    2s x 2s canvas -> s x s). Boxes are warped through their four corners (or through the polygons
    when every target has one) and filtered with ``box_candidates``.
    Returns (image, targets (m, 5) [cls, x1, y1, x2, y2] in output pixels).
    """
    rng = _rng(rng)
    size = (im.shape[0] + border[0] * 2, im.shape[1] + border[1] * 2)  # (h, w)
    matrix, gain = _perspective_matrix(
        im.shape[:2], size, degrees, translate, scale, shear, perspective, rng
    )
    if border[0] or border[1] or (matrix != np.eye(3)).any():
        dsize = (size[1], size[0])
        if perspective:
            im = cv2.warpPerspective(im, matrix, dsize=dsize, borderValue=PAD_COLOUR)
        else:
            im = cv2.warpAffine(im, matrix[:2], dsize=dsize, borderValue=PAD_COLOUR)
    n = len(targets)
    if not n:
        return im, np.zeros((0, 5), dtype=np.float32)
    targets = np.asarray(targets, dtype=np.float32)
    use_segments = len(segments) == n and any(s.any() for s in segments)
    if use_segments:
        warped = [_apply_matrix(s, matrix, bool(perspective)) for s in resample_segments(segments)]
        new = np.stack([segment2box(s, size[1], size[0]) for s in warped])
    else:
        new = _warp_boxes(targets, matrix, bool(perspective), size)
    keep = box_candidates(targets[:, 1:5].T * gain, new.T, area_thr=0.01 if use_segments else 0.10)
    targets = targets[keep]
    targets[:, 1:5] = new[keep]
    return im, targets


def mixup(
    im: np.ndarray,
    labels: np.ndarray,
    im2: np.ndarray,
    labels2: np.ndarray,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(32, 32) ratio and keep the labels of both."""
    ratio = _rng(rng).beta(32.0, 32.0)
    blended = (im * ratio + im2 * (1 - ratio)).astype(np.uint8)
    return blended, np.concatenate((labels, labels2), 0)


def _ioa(box: np.ndarray, boxes: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Intersection of one xyxy box with each of (n, 4) boxes, over the area of each of those boxes."""
    inter_w = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(0)
    inter_h = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + eps
    return inter_w * inter_h / area


def _box_outline(box: np.ndarray) -> np.ndarray:
    """xyxy box -> (4, 2) rectangle polygon."""
    x1, y1, x2, y2 = box
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32)


def copy_paste(
    im: np.ndarray,
    labels: np.ndarray,
    segments: list[np.ndarray],
    p: float = 0.5,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Copy-paste (Ghiasi et al. 2021) as YOLOv5 does it: paste a mirrored copy of objects.

    A fraction ``p`` of the objects is flipped left-right and pasted where the copy covers no
    existing object by 30 % or more. The pasted pixels are the object's polygon when every label
    has one; for box-only labels (YOLOv5 would do nothing) the box rectangle itself is pasted.
    The image is modified in place; returns (image, labels, segments) with the copies appended.
    """
    n = len(labels)
    if not p or not n:
        return im, labels, segments
    rng = _rng(rng)
    width = im.shape[1]
    polygons = list(segments) if len(segments) == n else [_box_outline(b) for b in labels[:, 1:5]]
    paste_mask = np.zeros(im.shape[:2], np.uint8)
    new_labels, new_polygons = [labels], list(polygons)
    for j in rng.choice(n, size=round(p * n), replace=False):
        cls, x1, y1, x2, y2 = labels[j]
        mirrored = np.array([width - x2, y1, width - x1, y2], dtype=labels.dtype)
        if (_ioa(mirrored, np.concatenate(new_labels)[:, 1:5]) < 0.30).all():
            new_labels.append(np.array([[cls, *mirrored]], dtype=labels.dtype))
            new_polygons.append(np.stack((width - polygons[j][:, 0], polygons[j][:, 1]), axis=1))
            cv2.drawContours(paste_mask, [polygons[j].astype(np.int32)], -1, 1, cv2.FILLED)
    flipped_mask = cv2.flip(paste_mask, 1).astype(bool)
    im[flipped_mask] = cv2.flip(im, 1)[flipped_mask]
    out_segments = new_polygons if len(segments) == n else list(segments)
    return im, np.concatenate(new_labels, 0), out_segments
