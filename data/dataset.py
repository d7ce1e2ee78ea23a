"""LoadImagesAndLabels: verified images and YOLO labels -> training/validation samples (YOLOv5 semantics)."""

from __future__ import annotations

import logging
import math
import os
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.augment import augment_hsv, copy_paste, letterbox, mixup, random_perspective
from data.verify import scan_dataset
from utils.boxes import xyn2xy, xywhn2xyxy, xyxy2xywhn
from utils.general import yaml_load
from utils.hyp import check_hyp

LOGGER = logging.getLogger(f"vitdet.{__name__}")
DEFAULT_HYP = Path(__file__).resolve().parents[1] / "configs" / "hyps" / "hyp.scratch-low.yaml"
AUGMENT_KEYS = (
    "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
    "flipud", "fliplr", "mosaic", "mixup", "copy_paste",
)  # fmt: skip
CACHE_MODES = (False, "ram", "disk")


def _check_hyp(hyp: dict | None, augment: bool) -> dict:
    """The hyperparameters (hyp.scratch-low.yaml when None), checked by utils.hyp's rules when the
    dataset is built rather than in the first batch; training needs every augmentation key.
    Raises HypError (a ValueError) naming each bad or missing key."""
    source = "hyp given to LoadImagesAndLabels"
    if hyp is None:
        hyp, source = yaml_load(DEFAULT_HYP), str(DEFAULT_HYP)
    return check_hyp(hyp, source, required=AUGMENT_KEYS if augment else ())


class LoadImagesAndLabels(Dataset):
    """Images and labels of one dataset source (folder, .txt list, or a list of those).

    Attributes: im_files, label_files, labels (float32 (n, 5) [cls, x, y, w, h] normalised),
    segments (lists of (K, 2) normalised polygons, empty for box labels), shapes ((N, 2) original
    (w, h)), batch_shapes ((nb, 2) (h, w) letterbox shape of each batch, when rect), n.

    Items: (img uint8 tensor (3, H, W) RGB, labels_out float32 (n, 6) [0, cls, x, y, w, h]
    normalised to img, path, shapes). shapes = ((h0, w0), ((gain_h, gain_w), (pad_w, pad_h))) maps
    boxes in img back to the original image: x_original = (x - pad_w) / gain_w, likewise y (gains
    from original to img pixels, padding in img pixels); None for mosaic samples. As in YOLOv5 the
    two gains differ slightly (both sides are rounded up when resizing), so rescale each axis with
    its own gain. YOLOv5 reports only load_image's gain; this includes the letterbox's gain too,
    which is 1 whenever the image fits its batch shape.

    names: the dataset's class names (class ids must be below len(names)); names_source: the YAML
    they came from, named when most class ids do not fit them. hyp is checked when the dataset is
    built (utils.hyp.check_hyp); a source that loses most of its boxes to one reason stops here
    (data.verify.MostLabelsDroppedError).
    """

    def __init__(
        self,
        path: str | Path | list,
        img_size: int = 640,
        batch_size: int = 16,
        augment: bool = False,
        hyp: dict | None = None,
        rect: bool = False,
        cache_images: bool | str = False,
        single_cls: bool = False,
        stride: int = 32,
        pad: float = 0.0,
        prefix: str = "",
        names: list[str] | None = None,
        seed: int = 0,
        names_source: str | None = None,
    ):
        if cache_images not in CACHE_MODES and cache_images is not True:
            raise ValueError(f"cache_images must be one of {CACHE_MODES}, got {cache_images!r}")
        self.img_size, self.augment, self.rect, self.stride = img_size, augment, rect, stride
        self.hyp = _check_hyp(hyp, augment)
        self.mosaic = augment and not rect  # mosaic would undo the rectangular batch shapes
        self.mosaic_border = [-img_size // 2, -img_size // 2]
        self.prefix = prefix
        self.seed, self.epoch = int(seed), 0
        self.rng = np.random.default_rng(seed)
        scan = scan_dataset(path, nc=len(names) if names else None, prefix=prefix, names_source=names_source)
        self.im_files, self.label_files = scan.im_files, scan.label_files
        self.labels, self.segments, self.shapes = scan.labels, scan.segments, scan.shapes
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.n = len(self.im_files)
        self.batch = np.floor(np.arange(self.n) / batch_size).astype(int)  # batch index of each image
        self.indices = np.arange(self.n)
        self.batch_shapes = None
        if rect:
            self._sort_by_aspect_ratio(batch_size, pad)
        self.ims = [None] * self.n
        self.npy_files = [str(Path(f).with_suffix(".npy")) for f in self.im_files]
        if cache_images:
            self.cache_images("disk" if cache_images == "disk" else "ram")

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch` (the trainer calls this before each epoch)."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------ loading
    def _sort_by_aspect_ratio(self, batch_size: int, pad: float) -> None:
        """Order images by h/w and give each batch the smallest stride-multiple shape that fits it."""
        aspect = self.shapes[:, 1] / self.shapes[:, 0]
        order = aspect.argsort()
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.segments = [self.segments[i] for i in order]
        self.shapes, aspect = self.shapes[order], aspect[order]
        n_batches = self.batch[-1] + 1
        relative = np.ones((n_batches, 2))  # (h, w) as fractions of img_size
        for b in range(n_batches):
            batch_aspect = aspect[self.batch == b]
            low, high = batch_aspect.min(), batch_aspect.max()
            if high < 1:
                relative[b] = [high, 1]
            elif low > 1:
                relative[b] = [1, 1 / low]
        self.batch_shapes = np.ceil(relative * self.img_size / self.stride + pad).astype(int) * self.stride

    def _read_original(self, i: int) -> np.ndarray:
        """BGR (h0, w0, 3) uint8 of image i, from the disk cache when it is there and fresh."""
        npy = self.npy_files[i]
        if os.path.exists(npy) and os.path.getmtime(npy) >= os.path.getmtime(self.im_files[i]):
            return np.load(npy, allow_pickle=False)
        im = cv2.imread(self.im_files[i])
        if im is None:
            raise FileNotFoundError(f"{self.prefix}image {self.im_files[i]} cannot be read any more")
        return im

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image i resized so its long side is img_size: (BGR image, (h0, w0), (h, w))."""
        if self.ims[i] is not None:
            w0, h0 = self.shapes[i]
            return self.ims[i], (int(h0), int(w0)), self.ims[i].shape[:2]
        im = self._read_original(i)
        h0, w0 = im.shape[:2]
        gain = self.img_size / max(h0, w0)
        if gain != 1:
            shrink_for_eval = not self.augment and gain < 1  # area averaging looks better, costs more
            interp = cv2.INTER_AREA if shrink_for_eval else cv2.INTER_LINEAR
            im = cv2.resize(im, (math.ceil(w0 * gain), math.ceil(h0 * gain)), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def cache_images(self, mode: str) -> None:
        """'ram': keep every resized image in memory; 'disk': save originals as .npy next to them."""
        if mode == "ram" and not self._ram_fits():
            return
        if mode == "disk":
            work, label = self._save_npy, "disk"
        else:
            work, label = self.load_image, "RAM"
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
            for i, result in enumerate(pool.imap(work, range(self.n))):
                if mode == "ram":
                    self.ims[i] = result[0]
        LOGGER.info(f"{self.prefix}Cached {self.n} images ({label})")

    def _ram_fits(self) -> bool:
        gains = self.img_size / self.shapes.max(1)
        needed = float((np.ceil(self.shapes[:, 0] * gains) * np.ceil(self.shapes[:, 1] * gains) * 3).sum())
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if needed > 0.9 * available:
            LOGGER.warning(
                f"{self.prefix}not caching images in RAM: {needed / 2**30:.1f} GB needed, "
                f"{available / 2**30:.1f} GB available"
            )
            return False
        return True

    def _save_npy(self, i: int) -> None:
        npy = self.npy_files[i]
        if os.path.exists(npy) and os.path.getmtime(npy) >= os.path.getmtime(self.im_files[i]):
            return
        im = cv2.imread(self.im_files[i])
        if im is None:
            return  # _read_original reports it when the image is needed
        try:
            np.save(npy, im, allow_pickle=False)
        except OSError as e:
            LOGGER.warning(f"{self.prefix}disk cache: cannot write {npy} ({e})")

    # ------------------------------------------------------------------------------ samples
    def __getitem__(self, index: int):
        index = self.indices[index]
        # The random stream of a sample depends only on (seed, epoch, index): not on the worker that
        # loads it nor on what was loaded before, so a resumed run augments exactly as an unbroken one.
        self.rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        hyp = self.hyp
        if self.mosaic and self.rng.random() < hyp["mosaic"]:
            img, labels = self.load_mosaic(index)
            shapes = None
            if self.rng.random() < hyp["mixup"]:
                img, labels = mixup(img, labels, *self.load_mosaic(self.rng.integers(self.n)), rng=self.rng)
        else:
            img, labels, shapes = self._load_letterboxed(index)
            if self.augment:
                img, labels = random_perspective(img, labels, **self._warp_kwargs(), rng=self.rng)
        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        if self.augment:
            img, labels = self._flip_and_colour(img, labels)
        labels_out = torch.zeros((len(labels), 6))
        labels_out[:, 1:] = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        img = np.ascontiguousarray(img.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(img), labels_out, self.im_files[index], shapes

    def _warp_kwargs(self) -> dict:
        keys = ("degrees", "translate", "scale", "shear", "perspective")
        return {k: self.hyp[k] for k in keys}

    def _load_letterboxed(self, index: int):
        """Image letterboxed to img_size (or its batch shape); labels [cls, x1, y1, x2, y2] pixels."""
        img, (h0, w0), (h, w) = self.load_image(index)
        shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
        img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
        gains = float(h * ratio[1] / h0), float(w * ratio[0] / w0)
        shapes = (h0, w0), (gains, (float(pad[0]), float(pad[1])))
        labels = self.labels[index].copy()
        if len(labels):
            labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
        return img, labels, shapes

    def _flip_and_colour(self, img: np.ndarray, labels: np.ndarray):
        hyp = self.hyp
        augment_hsv(img, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"], rng=self.rng)
        if self.rng.random() < hyp["flipud"]:
            img = np.flipud(img)
            if len(labels):
                labels[:, 2] = 1 - labels[:, 2]
        if self.rng.random() < hyp["fliplr"]:
            img = np.fliplr(img)
            if len(labels):
                labels[:, 1] = 1 - labels[:, 1]
        return img, labels

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Four images (index + 3 random) tiled around a random centre on a 2s x 2s canvas, then
        copy-paste and random_perspective crop it to s x s. Labels [cls, x1, y1, x2, y2] pixels."""
        s = self.img_size
        yc, xc = (int(self.rng.uniform(-b, 2 * s + b)) for b in self.mosaic_border)
        indices = [int(index), *self.rng.choice(self.indices, size=3).tolist()]
        self.rng.shuffle(indices)
        canvas = np.full((s * 2, s * 2, 3), 114, dtype=np.uint8)
        all_labels, all_segments = [], []
        for tile, i in enumerate(indices):
            img, _, (h, w) = self.load_image(i)
            (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b) = _mosaic_tile(tile, xc, yc, w, h, s)
            canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
            pad_w, pad_h = x1a - x1b, y1a - y1b
            labels = self.labels[i].copy()
            if len(labels):
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], w, h, pad_w, pad_h)
            all_labels.append(labels)
            all_segments += [xyn2xy(seg, w, h, pad_w, pad_h) for seg in self.segments[i]]
        labels = np.concatenate(all_labels, 0)
        for x in (labels[:, 1:], *all_segments):
            np.clip(x, 0, 2 * s, out=x)
        canvas, labels, all_segments = copy_paste(
            canvas, labels, all_segments, p=self.hyp["copy_paste"], rng=self.rng)
        return random_perspective(
            canvas, labels, all_segments, **self._warp_kwargs(), border=self.mosaic_border, rng=self.rng
        )

    @staticmethod
    def collate_fn(batch):
        """List of items -> (imgs (B, 3, H, W) uint8, targets (M, 6) [image index, cls, x, y, w, h],
        paths, shapes)."""
        images, labels, paths, shapes = zip(*batch)
        for i, lb in enumerate(labels):
            lb[:, 0] = i
        return torch.stack(images, 0), torch.cat(labels, 0), paths, shapes

    @staticmethod
    def collate_fn4(batch):
        """YOLOv5's --quad collate: each group of 4 items becomes one image of twice the side, either the
        first image upsampled 2x or the four tiled 2x2 (top-left, bottom-left, top-right, bottom-right),
        labels moved and halved to match; a batch of B gives B // 4 images (paths and shapes of the first
        B // 4 items, as YOLOv5). Which of the two is a function of the pixels, so a rerun repeats it."""
        images, labels, paths, shapes = zip(*batch)
        n = len(images) // 4
        if not n:
            raise ValueError(f"--quad needs batches of at least 4 images, got {len(images)}")
        down, right = torch.tensor([[0.0, 0, 0, 1, 0, 0]]), torch.tensor([[0.0, 0, 1, 0, 0, 0]])
        halve = torch.tensor([[1, 1, 0.5, 0.5, 0.5, 0.5]])
        quads, quad_labels = [], []
        for i in range(0, 4 * n, 4):
            if int(images[i][:, ::8, ::8].sum()) % 2:  # pixel parity: a coin that reruns flip the same way
                big = F.interpolate(images[i][None].float(), scale_factor=2.0, mode="bilinear",
                                    align_corners=False)
                quads.append(big[0].to(images[i].dtype))
                quad_labels.append(labels[i].clone())
            else:
                left = torch.cat((images[i], images[i + 1]), 1)
                quads.append(torch.cat((left, torch.cat((images[i + 2], images[i + 3]), 1)), 2))
                parts = (labels[i], labels[i + 1] + down, labels[i + 2] + right, labels[i + 3] + down + right)
                quad_labels.append(torch.cat(parts, 0) * halve)
        for k, lb in enumerate(quad_labels):
            lb[:, 0] = k
        return torch.stack(quads, 0), torch.cat(quad_labels, 0), paths[:n], shapes[:n]


def _mosaic_tile(tile: int, xc: int, yc: int, w: int, h: int, s: int):
    """Where a w x h image goes on the 2s canvas around centre (xc, yc), and which part of it.

    Tiles 0..3 = top-left, top-right, bottom-left, bottom-right of the centre; returns
    ((x1a, y1a, x2a, y2a) on the canvas, (x1b, y1b, x2b, y2b) in the image).
    """
    if tile == 0:
        a = max(xc - w, 0), max(yc - h, 0), xc, yc
        b = w - (a[2] - a[0]), h - (a[3] - a[1]), w, h
    elif tile == 1:
        a = xc, max(yc - h, 0), min(xc + w, s * 2), yc
        b = 0, h - (a[3] - a[1]), min(w, a[2] - a[0]), h
    elif tile == 2:
        a = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
        b = w - (a[2] - a[0]), 0, w, min(a[3] - a[1], h)
    else:
        a = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
        b = 0, 0, min(w, a[2] - a[0]), min(a[3] - a[1], h)
    return a, b
