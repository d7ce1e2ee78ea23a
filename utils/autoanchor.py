"""AutoAnchor: check how well the Detect anchors fit a dataset's boxes and evolve better ones (YOLOv5).

Fit metric: for a label of size (w, h) and an anchor (aw, ah), r = min(w/aw, aw/w, h/ah, ah/h).
The loss assigns a label to an anchor when r > 1/thr (thr = hyp['anchor_t'], 4 by default), so the
best possible recall (BPR) is the fraction of labels with at least one such anchor.

Sizes here are in pixels of the training image (labels scaled so the long image side is `imgsz`);
the Detect module stores anchors in stride units, `anchors * stride` are pixels.

Datasets need `.shapes`, an (N, 2) array of original (width, height), and `.labels`, a list of N
(n_i, 5) arrays [class, x, y, w, h] normalised to the image.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.optim import de_parallel

LOGGER = logging.getLogger(f"vitdet.{__name__}")
PREFIX = "AutoAnchor: "
GOOD_BPR = 0.98  # at or below this the anchors are re-fitted


# --------------------------------------------------------------------------------------------------
# Label sizes and the fit metric
# --------------------------------------------------------------------------------------------------


def label_wh(dataset: Any, img_size: int, scale: np.ndarray | None = None) -> np.ndarray:
    """(L, 2) float32 label sizes in pixels, each image resized so its long side is `img_size`.

    `scale` (N, 1) multiplies each image's size (YOLOv5 jitters it by 0.9-1.1 in `check_anchors`).
    """
    if not (hasattr(dataset, "shapes") and hasattr(dataset, "labels")):
        raise ValueError(f"AutoAnchor: {type(dataset).__name__} has no .shapes and .labels to fit anchors to")
    shapes, labels = np.asarray(dataset.shapes, dtype=float), dataset.labels
    if shapes.ndim != 2 or shapes.shape[1] != 2:
        raise ValueError(f"AutoAnchor: dataset.shapes must be (N, 2) (width, height), got {shapes.shape}")
    if len(labels) != len(shapes):
        raise ValueError(
            f"AutoAnchor: dataset.labels must hold one array per image ({len(shapes)}), got {len(labels)}"
        )
    if (shapes <= 0).any():
        bad = int(np.nonzero((shapes <= 0).any(1))[0][0])
        raise ValueError(f"AutoAnchor: image {bad} has a non-positive size {shapes[bad].tolist()}")
    sizes = img_size * shapes / shapes.max(1, keepdims=True)
    if scale is not None:
        sizes = sizes * scale
    per_image = []
    for index, (size, rows) in enumerate(zip(sizes, labels)):
        rows = np.asarray(rows, dtype=float)
        if rows.size == 0:
            continue
        if rows.ndim != 2 or rows.shape[1] != 5:
            raise ValueError(f"AutoAnchor: labels of image {index} have shape {rows.shape}, expected (n, 5)")
        per_image.append(rows[:, 3:5] * size)
    if not per_image:
        return np.zeros((0, 2), dtype=np.float32)
    return np.concatenate(per_image).astype(np.float32)


def ratio_metric(wh: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, 2) label sizes x (K, 2) anchor sizes -> (L, K) fit r in (0, 1] and (L,) best fit per label."""
    ratio = wh[:, None].astype(np.float32) / np.asarray(anchors, dtype=np.float32)[None]
    fit = np.minimum(ratio, 1 / ratio).min(2)
    return fit, fit.max(1)


def best_possible_recall(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> tuple[float, float]:
    """(BPR, anchors per target): fraction of labels some anchor can be assigned to, and the mean
    number of anchors (of all levels) within the ratio threshold of each label."""
    if len(wh) == 0:
        return 0.0, 0.0
    fit, best = ratio_metric(wh, anchors)
    return float((best > 1 / thr).mean()), float((fit > 1 / thr).sum(1).mean())


# --------------------------------------------------------------------------------------------------
# Checking the model's anchors
# --------------------------------------------------------------------------------------------------


def check_anchor_order(detect: nn.Module, pixel_units: bool = False) -> bool:
    """Reverse the anchor levels in place when their sizes fall while the strides rise (or vice
    versa); returns True when it reversed them.

    `detect.anchors` is (nl, na, 2), in stride units unless `pixel_units`. Levels are compared by
    mean anchor area in pixels, and a reversal keeps each level's pixel size (so stride-unit values
    are rescaled for their new level).
    """
    stride = detect.stride.to(detect.anchors.device).view(-1, 1, 1).type_as(detect.anchors)
    pixels = detect.anchors if pixel_units else detect.anchors * stride
    area = pixels.prod(-1).mean(-1).view(-1)
    area_delta, stride_delta = area[-1] - area[0], stride[-1, 0, 0] - stride[0, 0, 0]
    if area_delta == 0 or area_delta.sign() == stride_delta.sign():
        return False
    LOGGER.info(f"{PREFIX}Reversing anchor order")
    with torch.no_grad():
        flipped = pixels.flip(0)
        detect.anchors[:] = flipped if pixel_units else flipped / stride
    return True


def check_anchors(
    dataset: Any, model: nn.Module, thr: float = 4.0, imgsz: int = 640, gen: int = 1000, seed: int = 0
) -> bool:
    """Check the anchors' BPR on `dataset`, re-fit them if it is not above 0.98; True when replaced.

    New anchors (k-means + evolution, `kmean_anchors`) are kept only if their BPR is higher. They are
    written into the Detect module in stride units and stride order (small anchors at stride 8).
    """
    detect = de_parallel(model).model[-1]
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(0.9, 1.1, size=(len(dataset.shapes), 1))  # YOLOv5's augment-scale jitter
    wh = label_wh(dataset, imgsz, jitter)
    if len(wh) == 0:
        LOGGER.info(f"{PREFIX}no labels in the dataset, anchors left as they are")
        return False
    stride = detect.stride.to(detect.anchors.device).view(-1, 1, 1).type_as(detect.anchors)
    current = (detect.anchors.detach() * stride).cpu().numpy().reshape(-1, 2)
    bpr, aat = best_possible_recall(wh, current, thr)
    summary = f"{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > GOOD_BPR:
        LOGGER.info(summary + "Current anchors are a good fit to dataset")
        return False
    LOGGER.info(summary + "Anchors are a poor fit to dataset, attempting to improve...")
    count = detect.anchors.numel() // 2
    new = kmean_anchors(dataset, n=count, img_size=imgsz, thr=thr, gen=gen, verbose=False, seed=seed + 1)
    new_bpr, _ = best_possible_recall(wh, new, thr)
    if new_bpr <= bpr:
        LOGGER.info(f"{PREFIX}Done (original anchors better than new anchors, keeping the original anchors)")
        return False
    with torch.no_grad():
        pixels = torch.from_numpy(new).to(detect.anchors).view_as(detect.anchors)
        detect.anchors[:] = pixels
        check_anchor_order(detect, pixel_units=True)
        detect.anchors /= stride
    LOGGER.info(f"{PREFIX}Done (new BPR {new_bpr:.3f}); new anchors saved to model. "
                "Update the model *.yaml to use these anchors in the future.")
    return True


# --------------------------------------------------------------------------------------------------
# k-means and evolution
# --------------------------------------------------------------------------------------------------


def kmeans(
    points: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 30, thresh: float = 1e-5
) -> tuple[np.ndarray, float]:
    """Lloyd's k-means with `restarts` random starts (k distinct points each); returns the centroids
    (k, D) with the lowest mean point-to-centroid distance, and that distance.

    Like scipy.cluster.vq.kmeans, a run stops when the mean distance improves by <= `thresh`. An
    emptied cluster keeps its previous centroid, so k centroids always come back.
    """
    if k > len(points):
        raise ValueError(f"k-means needs at least k={k} points, got {len(points)}")
    best_centroids, best_distortion = None, np.inf
    for _ in range(restarts):
        centroids = points[rng.choice(len(points), size=k, replace=False)].copy()
        centroids, distortion = _lloyd(points, centroids, thresh)
        if distortion < best_distortion:
            best_centroids, best_distortion = centroids, distortion
    return best_centroids, float(best_distortion)


def _lloyd(
    points: np.ndarray, centroids: np.ndarray, thresh: float, max_iter: int = 300
) -> tuple[np.ndarray, float]:
    previous = np.inf
    for _ in range(max_iter):
        distance = np.linalg.norm(points[:, None] - centroids[None], axis=2)  # (P, k)
        nearest = distance.argmin(1)
        distortion = float(distance[np.arange(len(points)), nearest].mean())
        for cluster in range(len(centroids)):
            members = points[nearest == cluster]
            if len(members):
                centroids[cluster] = members.mean(0)
        if previous - distortion <= thresh:
            break
        previous = distortion
    return centroids, distortion


def kmean_anchors(
    dataset: Any,
    n: int = 9,
    img_size: int = 640,
    thr: float = 4.0,
    gen: int = 1000,
    verbose: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Anchors fitted to `dataset`: (n, 2) float32 (w, h) in pixels, sorted by area (small first).

    k-means on the whitened label sizes (labels under 2 px on both sides left out), then `gen`
    generations of mutation that keep a candidate when its fitness, the mean best-fit over labels
    counting only fits above 1/thr, improves. Deterministic for a given `seed`.
    """
    rng = np.random.default_rng(seed)
    wh_all = label_wh(dataset, img_size)
    tiny = int((wh_all < 3.0).any(1).sum())
    if tiny:
        LOGGER.warning(f"{PREFIX}Extremely small objects: {tiny} of {len(wh_all)} labels are under 3 pixels")
    wh = wh_all[(wh_all >= 2.0).any(1)]
    anchors = _report(_initial_anchors(wh, n, img_size, rng), wh_all, n, img_size, thr, verbose=False)
    anchors = _evolve(anchors, wh, thr, gen, rng, verbose)
    return _report(anchors, wh_all, n, img_size, thr, verbose=True)


def _initial_anchors(wh: np.ndarray, n: int, img_size: int, rng: np.random.Generator) -> np.ndarray:
    if n > len(wh):  # too few labels: YOLOv5's random start
        LOGGER.warning(f"{PREFIX}k-means impossible on {len(wh)} label sizes, starting from random anchors")
        return np.sort(rng.random(n * 2)).reshape(n, 2) * img_size
    spread = wh.std(0)
    spread[spread <= 0] = 1.0  # all labels one width (or height): nothing to whiten on that axis
    LOGGER.info(f"{PREFIX}Running k-means for {n} anchors on {len(wh)} points...")
    centroids, _ = kmeans(wh / spread, n, rng)
    return centroids * spread


def _fitness(anchors: np.ndarray, wh: np.ndarray, thr: float) -> float:
    _, best = ratio_metric(wh, anchors)
    return float((best * (best > 1 / thr)).mean())


def _evolve(
    anchors: np.ndarray, wh: np.ndarray, thr: float, gen: int, rng: np.random.Generator, verbose: bool
) -> np.ndarray:
    """YOLOv5's genetic refinement: mutate each value with probability 0.9 by a factor
    1 + N(0, 1) * U(0, 1) * 0.1 (clipped to [0.3, 3]), anchors at least 2 px; keep improvements."""
    if len(wh) == 0:
        return anchors
    fitness, shape = _fitness(anchors, wh, thr), anchors.shape
    mutation_prob, sigma = 0.9, 0.1
    for generation in range(gen):
        factor = np.ones(shape)
        while (factor == 1).all():  # mutate until something changes
            mask = rng.random(shape) < mutation_prob
            factor = (mask * rng.random() * rng.standard_normal(shape) * sigma + 1).clip(0.3, 3.0)
        candidate = (anchors * factor).clip(min=2.0)
        candidate_fitness = _fitness(candidate, wh, thr)
        if candidate_fitness > fitness:
            fitness, anchors = candidate_fitness, candidate
            if verbose:
                LOGGER.info(f"{PREFIX}generation {generation}: fitness = {fitness:.4f}")
    return anchors


def _report(
    anchors: np.ndarray, wh_all: np.ndarray, n: int, img_size: int, thr: float, verbose: bool
) -> np.ndarray:
    """Sort anchors small to large by area, log their fit (when verbose) and return them as float32."""
    anchors = np.asarray(anchors, dtype=np.float32)
    anchors = anchors[np.argsort(anchors.prod(1))]
    if verbose and len(wh_all):
        fit, best = ratio_metric(wh_all, anchors)
        above = fit > 1 / thr
        past = float(fit[above].mean()) if above.any() else 0.0
        sizes = ", ".join(f"{round(w)},{round(h)}" for w, h in anchors)
        LOGGER.info(
            f"{PREFIX}thr={1 / thr:.2f}: {(best > 1 / thr).mean():.4f} best possible recall, "
            f"{above.mean() * n:.2f} anchors past thr; n={n}, img_size={img_size}, "
            f"metric_all={fit.mean():.3f}/{best.mean():.3f}-mean/best, past_thr={past:.3f}-mean: {sizes}"
        )
    return anchors
