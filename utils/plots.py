"""Drawing and plotting: box annotation (OpenCV), batch mosaics, label statistics, training curves,
metric curves, the confusion matrix and crop saving.

Matplotlib is used through ``Figure`` + the Agg canvas created inside each function, never through
pyplot, so nothing here changes global matplotlib state or needs a display. Images handed to the
annotator are BGR uint8 (OpenCV's convention) unless a docstring says otherwise.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.boxes import clip_boxes, xywh2xyxy, xyxy2xywh
from utils.metrics import fitness, smooth

# YOLOv5's 20-colour palette, hex RGB
_PALETTE_HEX = (
    "FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
    "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7",
)  # fmt: skip


def colors(i: int, bgr: bool = False) -> tuple[int, int, int]:
    """Colour of class i (cycling through 20), as an (R, G, B) or (B, G, R) tuple of ints 0..255."""
    hex_code = _PALETTE_HEX[int(i) % len(_PALETTE_HEX)]
    rgb = tuple(int(hex_code[k : k + 2], 16) for k in (0, 2, 4))
    return (rgb[2], rgb[1], rgb[0]) if bgr else rgb


def _new_figure(figsize: tuple[float, float], **subplot_kwargs):
    """A pyplot-free figure on an Agg canvas and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, tight_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplot_kwargs)


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts only draw ASCII; other characters become '?'."""
    return text.encode("ascii", "replace").decode("ascii")


class Annotator:
    """Draws boxes and labels onto an image with OpenCV (no font files, works offline).

    im: (H, W, 3) uint8 array, drawn on in place (made contiguous first if needed).
    example: kept for YOLOv5 compatibility (it chose a font for non-Latin names); Hershey fonts are
    ASCII-only, so non-ASCII label characters are drawn as '?'.
    """

    def __init__(self, im: np.ndarray, line_width: int | None = None, example: str = "abc") -> None:
        if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3:
            shape = getattr(im, "shape", type(im))
            raise ValueError(f"Annotator: expected an (H, W, 3) numpy image, got {shape}")
        self.im = np.ascontiguousarray(im)
        self.example = example
        self.lw = line_width or max(round(sum(im.shape) / 2 * 0.003), 2)

    def box_label(
        self,
        box: Sequence[float],
        label: str = "",
        color: tuple[int, int, int] = (128, 128, 128),
        txt_color: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        """Draw an xyxy pixel box and, if given, its label on a filled tab above (or inside) it."""
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(self.im, p1, p2, color, thickness=self.lw, lineType=cv2.LINE_AA)
        if not label:
            return
        label = _ascii(label)
        thickness = max(self.lw - 1, 1)
        font_scale = self.lw / 3
        w, h = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)[0]
        outside = p1[1] - h >= 3  # room for the tab above the box
        tab_corner = (p1[0] + w, p1[1] - h - 3) if outside else (p1[0] + w, p1[1] + h + 3)
        cv2.rectangle(self.im, p1, tab_corner, color, -1, cv2.LINE_AA)
        origin = (p1[0], p1[1] - 2) if outside else (p1[0], p1[1] + h + 2)
        cv2.putText(
            self.im, label, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, txt_color, thickness, cv2.LINE_AA
        )

    def rectangle(self, xy: Sequence[float], color: tuple[int, int, int] = (255, 255, 255), width: int = 1):
        """Draw an unfilled xyxy rectangle."""
        cv2.rectangle(self.im, (int(xy[0]), int(xy[1])), (int(xy[2]), int(xy[3])), color, width)

    def text(self, xy: Sequence[float], text: str, txt_color: tuple[int, int, int] = (255, 255, 255)):
        """Write text with its top-left corner at xy."""
        thickness = max(self.lw - 1, 1)
        h = cv2.getTextSize("A", cv2.FONT_HERSHEY_SIMPLEX, self.lw / 3, thickness)[0][1]
        cv2.putText(
            self.im, _ascii(text), (int(xy[0]), int(xy[1]) + h), cv2.FONT_HERSHEY_SIMPLEX,
            self.lw / 3, txt_color, thickness, cv2.LINE_AA,
        )  # fmt: skip

    def result(self) -> np.ndarray:
        """The annotated image, (H, W, 3) uint8."""
        return np.asarray(self.im)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _mosaic(images: np.ndarray, grid: int) -> np.ndarray:
    """(B, 3, h, w) RGB 0..255 -> (grid*h, grid*w, 3) uint8, filled column by column, white gaps."""
    _, _, h, w = images.shape
    mosaic = np.full((grid * h, grid * w, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        x, y = w * (i // grid), h * (i % grid)
        mosaic[y : y + h, x : x + w] = im.transpose(1, 2, 0).clip(0, 255).astype(np.uint8)
    return mosaic


def _draw_image_targets(annotator, image_targets, origin, tile_hw, scale, names) -> None:
    """Boxes of one tile: rows [img_idx, cls, x, y, w, h(, conf)], normalised or pixel xywh."""
    boxes = xywh2xyxy(image_targets[:, 2:6].astype(np.float64))
    if len(boxes) and boxes.max() <= 1.01:  # normalised coordinates
        boxes[:, [0, 2]] *= tile_hw[1]
        boxes[:, [1, 3]] *= tile_hw[0]
    elif scale < 1:
        boxes *= scale
    boxes[:, [0, 2]] += origin[0]
    boxes[:, [1, 3]] += origin[1]
    has_conf = image_targets.shape[1] > 6
    for row, box in zip(image_targets, boxes):
        cls = int(row[1])
        name = names[cls] if names is not None and 0 <= cls < len(names) else str(cls)
        if has_conf and row[6] <= 0.25:  # predictions: only the confident ones
            continue
        label = f"{name} {row[6]:.1f}" if has_conf else name
        annotator.box_label(box, label, color=colors(cls))


def plot_images(
    images,
    targets,
    paths: Sequence[str] | None = None,
    fname: str | Path = "images.jpg",
    names: Sequence[str] | dict | None = None,
) -> Path:
    """Write a mosaic of up to 16 batch images with their boxes (train_batch*.jpg, val_batch*_pred.jpg).

    images: (B, 3, H, W) RGB, uint8-range or [0, 1] floats (tensor or array).
    targets: (M, 6) labels [img_idx, cls, x, y, w, h] or (M, 7) predictions with a conf column;
    xywh either normalised (all <= 1.01) or in pixels of the batch images. Predictions with conf
    <= 0.25 are not drawn. Returns the path written.
    """
    images = _to_numpy(images).astype(np.float32)
    targets = _to_numpy(targets).astype(np.float64)
    if targets.size == 0:
        targets = targets.reshape(0, 6)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"plot_images: images must be (B, 3, H, W), got {images.shape}")
    if targets.ndim != 2 or targets.shape[1] not in (6, 7):
        raise ValueError(f"plot_images: targets must be (M, 6) or (M, 7), got {targets.shape}")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    images = images[:16]
    if images.size and images.max() <= 1:
        images = images * 255
    batch, _, h, w = images.shape
    grid = int(np.ceil(batch**0.5))
    mosaic = _mosaic(images, grid)
    scale = 1920 / grid / max(h, w)
    if scale < 1:  # keep the mosaic under 1920 px
        h, w = math.ceil(scale * h), math.ceil(scale * w)
        mosaic = cv2.resize(mosaic, (w * grid, h * grid))
    annotator = Annotator(mosaic, line_width=max(round((h + w) * grid * 0.01 / 10), 1))
    for i in range(batch):
        origin = (w * (i // grid), h * (i % grid))
        annotator.rectangle((*origin, origin[0] + w, origin[1] + h), (255, 255, 255), 2)
        if paths is not None and i < len(paths):
            annotator.text((origin[0] + 5, origin[1] + 5), Path(paths[i]).name[:40], (220, 220, 220))
        image_targets = targets[targets[:, 0] == i]
        if len(image_targets):
            _draw_image_targets(annotator, image_targets, origin, (h, w), scale, names)
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    _write_image(fname, cv2.cvtColor(annotator.result(), cv2.COLOR_RGB2BGR))
    return fname


def _write_image(path: Path, bgr: np.ndarray) -> None:
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"could not write image {path} (unknown extension or unwritable folder?)")


def _boxes_canvas(labels: np.ndarray, size: int = 2000) -> np.ndarray:
    """First 1000 normalised xywh boxes drawn centred on one white canvas (shape/size overview)."""
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    rows = labels[:1000]
    centred = np.concatenate((np.full((len(rows), 2), 0.5), rows[:, 3:5]), 1) * size
    for cls, box in zip(rows[:, 0].astype(int), xywh2xyxy(centred)):
        cv2.rectangle(canvas, (int(box[0]), int(box[1])), (int(box[2]), int(box[3])), colors(cls), 2)
    return canvas


def plot_labels(labels, names: Sequence[str] | dict = (), save_dir: str | Path = "") -> Path:
    """Dataset label statistics -> save_dir/labels.jpg (instances per class, box shapes, x/y and w/h).

    labels: (N, 5) rows [cls, x, y, w, h], xywh normalised to [0, 1].
    """
    labels = _to_numpy(labels).reshape(-1, 5).astype(np.float64)
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    nc = int(labels[:, 0].max()) + 1 if len(labels) else max(len(names), 1)
    fig, axes = _new_figure((8, 8), nrows=2, ncols=2)
    ax = axes.ravel()
    counts = np.bincount(labels[:, 0].astype(int), minlength=nc)
    bars = ax[0].bar(range(nc), counts, color=[np.array(colors(i)) / 255 for i in range(nc)])
    ax[0].set_ylabel("instances")
    if 0 < len(names) < 30:
        ax[0].set_xticks(range(len(names)))
        ax[0].set_xticklabels(list(names), rotation=90, fontsize=8)
    else:
        ax[0].set_xlabel("classes")
    ax[0].bar_label(bars, fontsize=7)
    ax[1].imshow(_boxes_canvas(labels))
    ax[1].axis("off")
    for axis, (a, b), (xlabel, ylabel) in ((ax[2], (1, 2), ("x", "y")), (ax[3], (3, 4), ("width", "height"))):
        axis.hist2d(labels[:, a], labels[:, b], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
    out = Path(save_dir) / "labels.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=200)
    return out


def _read_results_csv(file: Path) -> tuple[list[str], np.ndarray]:
    """Column names (stripped) and an (epochs, columns) float array from a results.csv."""
    with open(file, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if len(rows) < 2:
        raise ValueError(f"plot_results: {file} has no data rows below its header")
    header = [name.strip() for name in rows[0]]
    try:
        data = np.array([[float(v) for v in row] for row in rows[1:]], dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"plot_results: {file} has a non-numeric value ({error})") from None
    if data.shape[1] != len(header):
        raise ValueError(f"plot_results: {file} rows have {data.shape[1]} values for {len(header)} columns")
    return header, data


def plot_results(file: str | Path = "path/to/results.csv") -> Path:
    """Plot every metric/loss column of a training results.csv against epoch -> results.png beside it.

    The first column is the epoch; columns named 'x/...' (learning rates, YOLOv5's naming) are
    skipped. A folder is accepted too: every results*.csv in it is drawn on the same axes.
    """
    file = Path(file)
    files = sorted(file.glob("results*.csv")) if file.is_dir() else [file]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"plot_results: no results csv at {file}")
    header, _ = _read_results_csv(files[0])
    columns = [i for i, name in enumerate(header) if i > 0 and not name.startswith("x/")]
    ncols = max(math.ceil(len(columns) / 2), 1)
    fig, axes = _new_figure((3 * ncols, 6), nrows=2, ncols=ncols, squeeze=False)
    ax = axes.ravel()
    for f in files:
        names, data = _read_results_csv(f)
        for k, column in enumerate(columns):
            y = data[:, column]
            ax[k].plot(data[:, 0], y, marker=".", label=f.stem, linewidth=2, markersize=6)
            if len(y) > 2:
                ax[k].plot(data[:, 0], smooth(y, 0.05), ":", label="smooth", linewidth=2)
            ax[k].set_title(names[column], fontsize=11)
    ax[0].legend()
    out = files[0].parent / "results.png"
    fig.savefig(out, dpi=200)
    return out


def plot_pr_curve(
    px: np.ndarray, py: np.ndarray, ap: np.ndarray, file: str | Path, names: Sequence[str]
) -> Path:
    """Precision-recall curves at IoU 0.5. px: (1000,) recall axis; py: (nc, 1000); ap: (nc, T)."""
    fig, ax = _new_figure((9, 6))
    show_legend = 0 < len(names) < 21
    for i, y in enumerate(py):
        label = f"{names[i]} {ap[i, 0]:.3f}" if show_legend else None
        ax.plot(px, y, linewidth=1, label=label, color="grey" if not show_legend else None)
    if len(py):
        ax.plot(px, py.mean(0), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title("Precision-Recall Curve")
    fig.savefig(file, dpi=250)
    return Path(file)


def plot_mc_curve(
    px: np.ndarray, py: np.ndarray, file: str | Path, names: Sequence[str], xlabel: str = "Confidence",
    ylabel: str = "Metric",
) -> Path:  # fmt: skip
    """A metric against confidence for each class (py (nc, 1000) over px (1000,)) plus the mean."""
    fig, ax = _new_figure((9, 6))
    show_legend = 0 < len(names) < 21
    for i, y in enumerate(py):
        ax.plot(px, y, linewidth=1, label=names[i] if show_legend else None,
                color="grey" if not show_legend else None)  # fmt: skip
    if len(py):
        mean = smooth(py.mean(0), 0.05)
        best = mean.argmax()
        ax.plot(px, mean, linewidth=3, color="blue", label=f"all classes {mean[best]:.2f} at {px[best]:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title(f"{ylabel}-Confidence Curve")
    fig.savefig(file, dpi=250)
    return Path(file)


def plot_confusion_matrix(
    matrix: np.ndarray, file: str | Path, names: Sequence[str] = (), normalize: bool = True
) -> Path:
    """Heat map of an (nc+1, nc+1) confusion matrix (rows predicted, columns true, last = background)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    values = matrix / (matrix.sum(0, keepdims=True) + 1e-9) if normalize else matrix.copy()
    values[values < 0.005] = np.nan  # blank the cells that would only show noise
    nc = matrix.shape[0] - 1
    ticks = list(names) + ["background"] if 0 < len(names) < 99 and len(names) == nc else None
    fig, ax = _new_figure((12, 9))
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax)
    if nc < 30:  # annotate the cells while they are still readable
        for (row, col), value in np.ndenumerate(values):
            if not np.isnan(value):
                ax.text(col, row, f"{value:.2f}" if normalize else f"{value:.0f}", ha="center", va="center",
                        fontsize=8, color="white" if normalize and value > 0.5 else "black")  # fmt: skip
    if ticks:
        ax.set_xticks(range(nc + 1))
        ax.set_xticklabels(ticks, rotation=90, fontsize=8)
        ax.set_yticks(range(nc + 1))
        ax.set_yticklabels(ticks, fontsize=8)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion Matrix")
    fig.savefig(file, dpi=250)
    return Path(file)


def _unused_path(file: Path) -> Path:
    """file if free, else the same name with 2, 3, ... before the suffix (crop2.jpg, crop3.jpg)."""
    if not file.exists():
        return file
    for n in range(2, 100000):
        candidate = file.with_name(f"{file.stem}{n}{file.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"save_one_box: no free name left for {file}")


def save_one_box(
    xyxy,
    im: np.ndarray,
    file: str | Path = Path("im.jpg"),
    gain: float = 1.02,
    pad: int = 10,
    square: bool = False,
    BGR: bool = False,
    save: bool = True,
) -> np.ndarray:
    """Crop one xyxy pixel box out of a BGR (H, W, 3) image, enlarged by gain and pad pixels.

    square makes the crop square (the longer side). The crop is saved as a JPEG at file, or at
    file2.jpg, file3.jpg, ... if that name is taken (never overwrites). Returns the crop as BGR when
    BGR is True, else RGB (YOLOv5's convention).
    """
    box = xyxy2xywh(torch.as_tensor(np.asarray(xyxy, dtype=np.float32)).view(-1, 4))
    if square:
        box[:, 2:] = box[:, 2:].max(1, keepdim=True).values
    box[:, 2:] = box[:, 2:] * gain + pad
    corners = clip_boxes(xywh2xyxy(box).long(), im.shape[:2])[0].tolist()
    x1, y1, x2, y2 = (int(v) for v in corners)
    if x2 <= x1 or y2 <= y1:
        box_values = np.asarray(xyxy).ravel().tolist()
        raise ValueError(f"save_one_box: box {box_values} lies outside the {im.shape[:2]} image")
    crop = im[y1:y2, x1:x2]
    if save:
        path = _unused_path(Path(file).with_suffix(".jpg"))
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_image(path, np.ascontiguousarray(crop))
    return crop if BGR else np.ascontiguousarray(crop[..., ::-1])


def plot_evolve(file: str | Path, first_hyp_column: int = 7) -> Path:
    """evolve.png beside an evolve.csv: one panel per hyperparameter, fitness (0.1 mAP50 + 0.9
    mAP50-95) against its value for every generation, coloured by fitness, the best marked with +."""
    file = Path(file)
    header, data = _read_results_csv(file)
    keys = header[first_hyp_column:]
    fit = fitness(data)
    best = int(np.argmax(fit))
    ncols = max(math.ceil(math.sqrt(len(keys))), 1)
    nrows = max(math.ceil(len(keys) / ncols), 1)
    fig, axes = _new_figure((2.5 * ncols, 2.5 * nrows), nrows=nrows, ncols=ncols, squeeze=False)
    ax = axes.ravel()
    for i, key in enumerate(keys):
        values = data[:, first_hyp_column + i]
        ax[i].scatter(values, fit, c=fit, cmap="viridis", alpha=0.8, edgecolors="none")
        ax[i].plot(values[best], fit[best], "k+", markersize=15)
        ax[i].set_title(f"{key} = {values[best]:.3g}", fontsize=9)
        ax[i].tick_params(labelsize=7)
    for extra in ax[len(keys):]:
        extra.set_visible(False)
    out = file.with_name("evolve.png")
    fig.savefig(out, dpi=120)
    return out


STUDY_COLUMNS = ("imgsz", "P", "R", "mAP50", "mAP50-95", "pre-process ms", "inference ms", "NMS ms")


def plot_study(files: Sequence[str | Path], out: str | Path) -> Path:
    """study.png from val.py --task study's text files (one per weights file, one row per image size:
    the STUDY_COLUMNS): P, R, mAP50, mAP50-95 and inference time against image size, and mAP50-95
    against inference time, one line per weights file."""
    panels = (1, 2, 3, 4, 6)
    fig, axes = _new_figure((14, 6), nrows=2, ncols=3, squeeze=False)
    ax = axes.ravel()
    for file in files:
        rows = np.loadtxt(file, ndmin=2)
        label = Path(file).stem.removeprefix("study_")
        for panel, column in zip(ax, panels):
            panel.plot(rows[:, 0], rows[:, column], ".-", linewidth=2, markersize=8, label=label)
            panel.set_title(STUDY_COLUMNS[column])
            panel.set_xlabel("image size (pixels)")
        ax[5].plot(rows[:, 6], rows[:, 4], ".-", linewidth=2, markersize=8, label=label)
    ax[5].set_xlabel("inference ms per image")
    ax[5].set_ylabel("mAP50-95")
    ax[5].legend(loc="lower right", fontsize=8)
    out = Path(out)
    fig.savefig(out, dpi=150)
    return out
