"""The built-in dataset: coloured shapes on textured backgrounds, generated on first use.

Deterministic: image k of split s comes from ``numpy.random.default_rng([seed, s, k])``, so the same
version, seed and library versions give the same bytes. Objects span 8 px to half the short image
side (log-uniform), so every detection stride (8, 16, 32) has objects to learn; about 10 % of the
images are backgrounds (no label file). Labels are the tight boxes of the drawn pixels.

Generation writes into a temporary folder beside the target and renames it into place, so a crash
never leaves half a dataset and two processes (DDP ranks) generating at once are harmless.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np

from utils.boxes import xyxy2xywhn
from utils.files import atomic_dir

LOGGER = logging.getLogger(f"vitdet.{__name__}")
VERSION = 1  # bump when the output changes; it is part of the cache folder name
SEED = 0
SPLITS = {"train": 256, "val": 64}
CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
CLASS_COLOURS = (  # BGR, one distinct hue per class
    (40, 40, 215),  # red circle
    (50, 185, 50),  # green square
    (215, 100, 30),  # blue triangle
    (30, 205, 225),  # yellow cross
    (200, 50, 200),  # magenta ring
    (30, 140, 250),  # orange diamond
)
IMAGE_SIDES = (320, 640)  # pixels, each side drawn independently
MIN_OBJECT, MAX_OBJECT_FRACTION = 8, 0.5  # smallest side in px; largest as fraction of the short side
BACKGROUND_FRACTION = 0.1
MAX_OVERLAP = 0.25  # intersection over either box's area allowed between objects
JPEG_QUALITY = 90


def default_root(datasets: Path) -> Path:
    """Folder of this generator version under the datasets cache folder."""
    return Path(datasets) / f"builtin-v{VERSION}"


def grain_tile(seed: int) -> np.ndarray:
    """Shared per-pixel noise (float32 (H, W, 3), unit variance) that images crop at random offsets;
    drawing fresh noise for every pixel of every image would dominate the generation time."""
    side = IMAGE_SIDES[1] * 2
    return np.random.default_rng([seed, 1 << 20]).standard_normal((side, side, 3), dtype=np.float32)


def _background(rng: np.random.Generator, h: int, w: int, grain: np.ndarray) -> np.ndarray:
    """Muted base colour + smooth blotches + stripes (drawn at 1/4 size and upsampled) + grain + a
    few thin lines; float32 (h, w, 3)."""
    sh, sw = h // 4 + 1, w // 4 + 1
    cells = (int(rng.integers(3, 9)), int(rng.integers(3, 9)))
    # mostly brightness, a little tint: a saturated background would mimic the class colours
    brightness = rng.standard_normal((*cells, 1), dtype=np.float32)
    grid = brightness + 0.35 * rng.standard_normal((*cells, 3), dtype=np.float32)
    low = cv2.resize(grid, (sw, sh), interpolation=cv2.INTER_CUBIC) * rng.uniform(10, 30)
    angle, period = rng.uniform(0, np.pi), rng.uniform(1.5, 10)  # period in 1/4-size pixels
    xs, ys = np.arange(sw, dtype=np.float32)[None], np.arange(sh, dtype=np.float32)[:, None]
    phase = xs * np.cos(angle) + ys * np.sin(angle)
    low += (np.sin(phase * (2 * np.pi / period)) * rng.uniform(0, 12))[..., None]
    low += (rng.uniform(70, 170) + rng.uniform(-20, 20, 3)).astype(np.float32)
    y0, x0 = (int(v) for v in rng.integers(0, grain.shape[0] - max(h, w), 2))
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
    img += grain[y0 : y0 + h, x0 : x0 + w] * np.float32(rng.uniform(2, 8))
    for _ in range(int(rng.integers(3, 12))):
        p1, p2 = rng.integers(0, (w, h), 2), rng.integers(0, (w, h), 2)
        colour = tuple(float(c) for c in low[0, 0] + rng.uniform(-50, 50, 3))
        cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), colour, int(rng.integers(1, 3)))
    return img


def _shape_mask(cls: int, bw: int, bh: int, rng: np.random.Generator) -> np.ndarray:
    """(bh, bw) uint8 mask of class cls's form filling a bw x bh patch."""
    mask = np.zeros((bh, bw), np.uint8)
    centre, axes = ((bw - 1) // 2, (bh - 1) // 2), (max((bw - 1) // 2, 1), max((bh - 1) // 2, 1))
    if cls == 0:  # circle (ellipse)
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
    elif cls == 1:  # square (axis-aligned rectangle)
        mask[:] = 1
    elif cls == 2:  # triangle, apex up or down
        apex, base = (0, bh - 1) if rng.random() < 0.5 else (bh - 1, 0)
        cv2.fillPoly(mask, [np.array([[0, base], [bw // 2, apex], [bw - 1, base]], np.int32)], 1)
    elif cls == 3:  # cross
        tw, th = max(bw // 3, 1), max(bh // 3, 1)
        mask[:, (bw - tw) // 2 : (bw - tw) // 2 + tw] = 1
        mask[(bh - th) // 2 : (bh - th) // 2 + th, :] = 1
    elif cls == 4:  # ring
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
        inner = (max(int(axes[0] * 0.55), 1), max(int(axes[1] * 0.55), 1))
        cv2.ellipse(mask, centre, inner, 0, 0, 360, 0, -1)
    else:  # diamond
        pts = [[bw // 2, 0], [bw - 1, bh // 2], [bw // 2, bh - 1], [0, bh // 2]]
        cv2.fillPoly(mask, [np.array(pts, np.int32)], 1)
    return mask


def _place(rng: np.random.Generator, w: int, h: int, boxes: list) -> tuple[int, int, int, int] | None:
    """A random (x0, y0, bw, bh) patch overlapping no placed box by more than MAX_OVERLAP."""
    largest = MAX_OBJECT_FRACTION * min(w, h)
    for _ in range(30):
        side = np.exp(rng.uniform(np.log(MIN_OBJECT), np.log(largest)))
        aspect = np.exp(rng.uniform(-0.4, 0.4))
        bw = int(np.clip(side * np.sqrt(aspect), MIN_OBJECT, w))
        bh = int(np.clip(side / np.sqrt(aspect), MIN_OBJECT, h))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        if all(_overlap((x0, y0, x0 + bw, y0 + bh), b) <= MAX_OVERLAP for b in boxes):
            return x0, y0, bw, bh
    return None


def _overlap(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def render_image(rng: np.random.Generator, grain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sample: (BGR uint8 image, labels (n, 5) [cls, x1, y1, x2, y2] in pixels, tight boxes).

    grain: the shared noise tile of ``grain_tile``."""
    w, h = (int(v) for v in rng.integers(IMAGE_SIDES[0], IMAGE_SIDES[1] + 1, 2))
    img = _background(rng, h, w, grain)
    n_objects = 0 if rng.random() < BACKGROUND_FRACTION else int(rng.integers(3, 21))
    boxes, labels = [], []
    for _ in range(n_objects):
        patch = _place(rng, w, h, boxes)
        if patch is None:
            continue
        x0, y0, bw, bh = patch
        cls = int(rng.integers(len(CLASS_NAMES)))
        mask = _shape_mask(cls, bw, bh, rng).astype(bool)
        ys, xs = np.nonzero(mask)
        colour = np.array(CLASS_COLOURS[cls], np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
        top, bottom = rng.uniform(0.8, 1.0), rng.uniform(1.0, 1.15)  # a vertical shading gradient
        shade = np.linspace(top, bottom, bh, dtype=np.float32)[:, None, None]
        region = img[y0 : y0 + bh, x0 : x0 + bw]
        region[mask] = (colour * shade + rng.standard_normal((bh, bw, 3), dtype=np.float32) * 4)[mask]
        box = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
        boxes.append(box)
        labels.append((cls, *box))
    image = np.clip(img, 0, 255).astype(np.uint8)
    return image, np.array(labels, dtype=np.float64).reshape(-1, 5)


def _write_sample(root: Path, split: str, name: str, image: np.ndarray, labels: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for built-in image {split}/{name}")
    (root / "images" / split / f"{name}.jpg").write_bytes(encoded.tobytes())
    if len(labels):
        h, w = image.shape[:2]
        xywhn = xyxy2xywhn(labels[:, 1:], w=w, h=h)
        rows = [f"{int(c)} " + " ".join(f"{v:.6f}" for v in box) for c, box in zip(labels[:, 0], xywhn)]
        (root / "labels" / split / f"{name}.txt").write_text("\n".join(rows) + "\n")


def _write_yaml(root: Path, splits: dict[str, int]) -> None:
    lines = ["# Built-in dataset (data/builtin.py); `path` omitted = this folder", *(
        f"{split}: images/{split}" for split in splits
    ), "names:", *(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))]  # fmt: skip
    (root / "builtin.yaml").write_text("\n".join(lines) + "\n")


def generate_builtin(root: str | Path, splits: dict[str, int] | None = None, seed: int = SEED) -> Path:
    """Generate the dataset into ``root`` (which must not exist yet) atomically; returns root.

    Layout: root/images/<split>/NNNNNN.jpg, root/labels/<split>/NNNNNN.txt, root/builtin.yaml.
    """
    root, splits = Path(root), splits or SPLITS
    start = time.perf_counter()
    with atomic_dir(root, replace=False) as tmp:  # a concurrent generator may win the race: keep its copy
        grain = grain_tile(seed)
        for split_index, (split, count) in enumerate(splits.items()):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for k in range(count):
                image, labels = render_image(np.random.default_rng([seed, split_index, k]), grain)
                _write_sample(tmp, split, f"{k:06d}", image, labels)
        _write_yaml(tmp, splits)
    total = sum(splits.values())
    elapsed = time.perf_counter() - start
    LOGGER.info(f"Built-in dataset: {total} images generated in {elapsed:.1f} s -> {root}")
    return root


def ensure_builtin(root: str | Path) -> Path:
    """The built-in dataset at ``root``, generated first if it is not there."""
    root = Path(root)
    if not (root / "builtin.yaml").is_file():
        LOGGER.info(f"Built-in dataset not found at {root}: generating it (no download needed)")
        generate_builtin(root)
    return root
