"""Detections of a batch of images, as the Python API returns them and detect.py writes them.

    results = detector(["a.jpg", "b.jpg"])
    results.xyxy[0]          # (k, 6) tensor: x1, y1, x2, y2 (pixels of the original image), conf, class
    results.xywhn[1]         # (k, 6): x_centre, y_centre, width, height normalised to [0, 1], conf, class
    results.to_records()     # [{'image': 'a.jpg', 'xmin': ..., 'confidence': ..., 'class': 0, 'name': ...}]
    results.print()          # 'image 1/2 a.jpg: 480x640 2 RBC, 1 WBC' lines and the speed line
    results.save("runs/detect/exp")   # annotated images (a new exp2, exp3, ... folder if it exists)
    results.crop("runs/detect/exp")   # crops/<class name>/<image stem>.jpg, as detect.py --save-crop
    for one in results: ...  # one Results per image

Boxes are never rounded here; drawing rounds to whole pixels. Names that come from the weights file or
from a source (class names, image names, URL stems) are made safe path components before they name a
file, exactly as detect.py does.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.boxes import xyxy2xywh
from utils.general import increment_path
from utils.paths import safe_path_component
from utils.plots import Annotator, colors, save_one_box

LOGGER = logging.getLogger(f"vitdet.{__name__}")
RECORD_KEYS = ("image", "xmin", "ymin", "xmax", "ymax", "confidence", "class", "name")


def describe(det: torch.Tensor, names: Sequence[str]) -> str:
    """'2 car, 1 person, ' (classes in id order) or '(no detections), '."""
    if not len(det):
        return "(no detections), "
    counts = Counter(int(c) for c in det[:, 5].tolist())
    return "".join(f"{n} {names[c]}, " for c, n in sorted(counts.items()))


def annotate(det: torch.Tensor, image: np.ndarray, names: Sequence[str], line_width: int | None = None,
             labels: bool = True, conf: bool = True) -> np.ndarray:
    """A copy of BGR `image` with the (k, 6) xyxy/conf/class boxes drawn (highest confidence on top)."""
    annotator = Annotator(image.copy(), line_width=line_width, example=str(names))
    for *xyxy, score, cls in reversed(det.tolist()):
        c = int(cls)
        label = (names[c] if not conf else f"{names[c]} {score:.2f}") if labels else ""
        annotator.box_label(xyxy, label, color=colors(c, bgr=True))
    return annotator.result()


def crop_folders(names: Sequence[str]) -> list[str]:
    """One safe folder name per class (names come from the weights file: '../x' must not climb)."""
    return [safe_path_component(n) for n in names]


def save_crops(det: torch.Tensor, image: np.ndarray, crops_dir: Path, folders: Sequence[str],
               stem: str) -> list[Path]:
    """Write each box of `det` cut out of BGR `image` to crops_dir/<class folder>/<stem>.jpg (stem2.jpg, ...
    when taken; never overwrites). Returns the folders written into (one per box saved)."""
    written = []
    for *xyxy, _, cls in det.tolist():
        folder = crops_dir / folders[int(cls)]
        try:
            save_one_box(xyxy, image, file=folder / f"{stem}.jpg", BGR=True)
        except ValueError as err:  # a box squeezed to nothing by clipping has no pixels to save
            LOGGER.warning(f"crop skipped: {err}")
            continue
        written.append(folder)
    return written


def _normalised(boxes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    gain = torch.tensor([shape[1], shape[0], shape[1], shape[0], 1.0, 1.0], dtype=boxes.dtype)
    return boxes / gain


class Results:
    """The detections of one or more images.

    images: the original BGR (H, W, 3) uint8 images; detections: per image a (k, 6) float tensor
    [x1, y1, x2, y2 (pixels of that image), confidence, class id], sorted by confidence; files: a name
    per image (its file name, or image0.jpg, image1.jpg, ... for arrays); names: class names;
    times: (pre-process, inference, NMS) milliseconds per image; shape: the model input (B, 3, H, W)
    of the last batch.
    """

    def __init__(self, images: Sequence[np.ndarray], detections: Sequence[torch.Tensor], files: Sequence[str],
                 names: Sequence[str], times: Sequence[float] = (0.0, 0.0, 0.0),
                 shape: tuple[int, ...] | None = None):
        if not len(images) == len(detections) == len(files):
            raise ValueError(f"Results: {len(images)} images, {len(detections)} detections, "
                             f"{len(files)} files")
        self.images, self.files, self.names = list(images), list(files), list(names)
        self.xyxy = [d.detach().float().cpu() for d in detections]
        self.times, self.shape = tuple(times), shape

    # -- box formats ---------------------------------------------------------------------------------
    @property
    def xywh(self) -> list[torch.Tensor]:
        """Per image (k, 6): x_centre, y_centre, width, height (pixels), conf, class."""
        return [torch.cat((xyxy2xywh(d[:, :4]), d[:, 4:]), 1) for d in self.xyxy]

    @property
    def xyxyn(self) -> list[torch.Tensor]:
        """xyxy divided by each image's width and height (conf and class unchanged)."""
        return [_normalised(d, im.shape) for d, im in zip(self.xyxy, self.images)]

    @property
    def xywhn(self) -> list[torch.Tensor]:
        """xywh divided by each image's width and height (the YOLO label format, plus conf and class)."""
        return [_normalised(d, im.shape) for d, im in zip(self.xywh, self.images)]

    # -- containers ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Results:
        index = range(len(self))[i]  # IndexError for an index out of range; negative indices work
        return Results([self.images[index]], [self.xyxy[index]], [self.files[index]], self.names, self.times,
                       self.shape)

    def __iter__(self) -> Iterator[Results]:
        return (self[i] for i in range(len(self)))

    # -- outputs -------------------------------------------------------------------------------------
    def to_records(self) -> list[dict]:
        """One dict per box: image (file name), xmin, ymin, xmax, ymax (pixels), confidence, class, name."""
        records = []
        for file, det in zip(self.files, self.xyxy):
            for x1, y1, x2, y2, conf, cls in det.tolist():
                values = (file, x1, y1, x2, y2, conf, int(cls), self.names[int(cls)])
                records.append(dict(zip(RECORD_KEYS, values)))
        return records

    def to_pandas(self):
        """to_records() as a pandas DataFrame (pandas is not a dependency: install it to use this)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("Results.to_pandas() needs pandas (pip install pandas); to_records() gives the "
                              "same rows as dicts") from err
        return pd.DataFrame(self.to_records(), columns=list(RECORD_KEYS))

    def render(self, line_width: int | None = None, labels: bool = True,
               conf: bool = True) -> list[np.ndarray]:
        """Annotated BGR copies of the images (the originals are left as they are)."""
        pairs = zip(self.xyxy, self.images)
        return [annotate(d, im, self.names, line_width, labels, conf) for d, im in pairs]

    def save(self, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False,
             **render_options) -> Path:
        """Write the annotated images under their file names (made safe) into save_dir, or into exp2,
        exp3, ... when it exists and exist_ok is False; returns the folder."""
        folder = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        for file, image in zip(self.files, self.render(**render_options)):
            target = folder / safe_path_component(Path(file).name)
            if not cv2.imwrite(str(target), image):
                raise OSError(f"{target}: could not be written")
        LOGGER.info(f"Saved {len(self)} image{'s' if len(self) != 1 else ''} to {folder}")
        return folder

    def crop(self, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False) -> Path:
        """Write every box as save_dir/crops/<class name>/<image stem>.jpg (detect.py --save-crop's
        layout; stem2.jpg, ... for further boxes); returns the folder (a new exp2, ... unless exist_ok)."""
        folder = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        folders = crop_folders(self.names)
        for file, det, image in zip(self.files, self.xyxy, self.images):
            save_crops(det, image, folder / "crops", folders, safe_path_component(Path(file).stem))
        LOGGER.info(f"Saved crops to {folder / 'crops'}")
        return folder

    def summary(self) -> str:
        """The lines print() shows: one per image, then the speed line."""
        lines = []
        for i, (file, det, image) in enumerate(zip(self.files, self.xyxy, self.images)):
            found = describe(det, self.names).rstrip(", ")
            lines.append(f"image {i + 1}/{len(self)} {file}: {image.shape[0]}x{image.shape[1]} {found}")
        pre, infer, nms = self.times
        lines.append(f"Speed: {pre:.1f}ms pre-process, {infer:.1f}ms inference, {nms:.1f}ms NMS per image at "
                     f"shape {self.shape}")
        return "\n".join(lines)

    def print(self) -> None:
        print(self.summary())

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<Results: {len(self)} images, {sum(len(d) for d in self.xyxy)} boxes>"
