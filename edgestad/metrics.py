"""Evaluation metrics following the MVTec AD evaluation code.

The PRO curve, its integration (``trapezoid``) and AU-PRO follow the conventions of the official
MVTec AD / MVTec 3D-AD evaluation scripts (``pro_curve_util.compute_pro`` and
``generic_util.trapezoid``), so numbers are comparable with published MVTec AD results:

* ground-truth regions are the 8-connected components of each mask
  (``scipy.ndimage.label`` with a 3x3 structure of ones);
* the FPR at a threshold is taken over the OK pixels of *all* images together;
* the PRO at a threshold is the overlap of each region averaged over *all* regions of all images;
* thresholds are all distinct anomaly scores, so tied scores form a single step;
* the curve starts at (0, 0) and ends at (1, 1);
* AU-PRO is the area up to an FPR limit (0.3 by default), divided by that limit.

Two deliberate differences, neither of which changes a result beyond float rounding: FPRs are kept
in float64 (MVTec casts them to float32 to save memory), and invalid input raises ``ValueError``
instead of failing an ``assert``.

The ROC AUCs use the Mann-Whitney rank formula with average ranks for ties, which equals the area
under the ROC curve with ties counted as half, without depending on scikit-learn.
"""

from __future__ import annotations

import warnings
from bisect import bisect
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

__all__ = ["au_pro", "image_auroc", "pixel_auroc", "pro_curve", "trapezoid"]

# 8-connectivity: pixels touching only diagonally belong to the same defect (MVTec convention).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _check_pairs(
    anomaly_maps: Sequence[np.ndarray], ground_truth_masks: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate map/mask pairs; return the maps as arrays and the masks as bool arrays."""
    maps = [np.asarray(m) for m in anomaly_maps]
    masks = [np.asarray(m) for m in ground_truth_masks]
    if len(maps) != len(masks):
        raise ValueError(
            f"got {len(maps)} anomaly maps but {len(masks)} ground-truth masks; they must pair up"
        )
    if not maps:
        raise ValueError("no anomaly maps given")
    bool_masks = []
    for i, (amap, mask) in enumerate(zip(maps, masks)):
        if amap.ndim != 2:
            raise ValueError(f"pair {i}: anomaly map must be 2-D (H x W), got shape {amap.shape}")
        if mask.shape != amap.shape:
            raise ValueError(
                f"pair {i}: ground-truth mask shape {mask.shape} != anomaly map shape {amap.shape}"
            )
        if not np.issubdtype(amap.dtype, np.number) or np.issubdtype(amap.dtype, np.complexfloating):
            raise ValueError(f"pair {i}: anomaly map must hold real numbers, got dtype {amap.dtype}")
        if not np.isfinite(amap).all():
            raise ValueError(f"pair {i}: anomaly map contains NaN or infinite values")
        if mask.dtype != bool:
            # A mask with other values (e.g. 128 from a non-nearest resize) is an upstream bug;
            # silently thresholding it would change the regions.
            bad = (mask != 0) & (mask != 1) & (mask != 255)
            if bad.any():
                raise ValueError(
                    f"pair {i}: ground-truth mask must be bool, {{0, 1}} or {{0, 255}}; "
                    f"found value {mask[bad].flat[0].item()!r}"
                )
            mask = mask != 0
        bool_masks.append(mask)
    return maps, bool_masks


def pro_curve(
    anomaly_maps: Sequence[np.ndarray], ground_truth_masks: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve as in MVTec AD's ``compute_pro``.

    Args:
        anomaly_maps: 2-D float arrays; higher means more anomalous.
        ground_truth_masks: 2-D masks of the same shapes (bool, {0, 1} or {0, 255}). An empty
            mask is valid: its image contributes OK pixels only.

    Returns:
        ``(fprs, pros)``: float64 arrays of equal length, FPR ascending, starting at (0, 0) and
        ending at (1, 1); one point per distinct anomaly score (threshold ``score >= t``).
    """
    maps, masks = _check_pairs(anomaly_maps, ground_truth_masks)

    ok_flags, region_weights = [], []
    num_ok_pixels = 0
    num_regions = 0
    for mask in masks:
        labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        # Each pixel of region k adds 1/|k| to that region's overlap when it crosses the threshold.
        weight = np.zeros(n + 1)
        weight[1:] = 1.0 / sizes[1:]
        region_weights.append(weight[labels].ravel())
        ok_flags.append((labels == 0).ravel())
        num_ok_pixels += int(sizes[0])
        num_regions += n
    if num_ok_pixels == 0:
        raise ValueError("the ground-truth masks contain no OK pixel, so the FPR is undefined")
    if num_regions == 0:
        raise ValueError(
            f"none of the {len(masks)} ground-truth masks contains an anomalous region, "
            "so the PRO is undefined"
        )

    scores = np.concatenate([m.ravel() for m in maps])
    # Descending: lowering the threshold step by step. A contiguous index array and np.take keep
    # the gathers fast (~6.5 M pixels for 100 maps of 256x256; the argsort dominates the runtime).
    order = np.ascontiguousarray(np.argsort(scores)[::-1])
    sorted_scores = np.take(scores, order)
    fprs = np.cumsum(np.take(np.concatenate(ok_flags), order)) / num_ok_pixels
    pros = np.cumsum(np.take(np.concatenate(region_weights), order)) / num_regions

    # All pixels with the same score cross the threshold together: keep only the last point of
    # each run of equal scores, which includes every change at that threshold.
    keep = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fprs, pros = fprs[keep], pros[keep]
    # The cumulative sums may overshoot 1 by rounding.
    np.clip(fprs, None, 1.0, out=fprs)
    np.clip(pros, None, 1.0, out=pros)
    zero, one = np.zeros(1), np.ones(1)
    return np.concatenate((zero, fprs, one)), np.concatenate((zero, pros, one))


def trapezoid(x: Sequence[float], y: Sequence[float], x_max: float | None = None) -> float:
    """Area under a curve with the trapezoidal rule, optionally only up to ``x_max``.

    As MVTec AD's ``generic_util.trapezoid``: ``x`` must be ascending and may repeat values (a
    vertical step; the order of the matching ``y`` values then matters). Non-finite points are
    dropped with a warning. If ``x_max`` is not a sample point, the curve is cut at the last
    sample below it and a correction term adds the trapezoid from there to ``x_max``, with
    ``y(x_max)`` linearly interpolated between the neighbouring samples.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        warnings.warn("trapezoid: dropping points with non-finite x or y", RuntimeWarning, stacklevel=2)
        x, y = x[finite], y[finite]

    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)  # x[ins - 1] < x_max < x[ins]
            if not 0 < ins < len(x):
                raise ValueError(
                    f"x_max={x_max} lies outside the sampled range [{x.min()}, {x.max()}]"
                    if len(x)
                    else "no finite points to integrate"
                )
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def au_pro(
    anomaly_maps: Sequence[np.ndarray],
    ground_truth_masks: Sequence[np.ndarray],
    integration_limit: float = 0.3,
) -> float:
    """Normalised area under the PRO curve up to FPR ``integration_limit`` (MVTec AD: 0.3).

    A perfect detector scores 1.0; a constant map scores ``integration_limit / 2``.
    """
    if not 0.0 < integration_limit <= 1.0:
        raise ValueError(f"integration_limit must be in (0, 1], got {integration_limit}")
    fprs, pros = pro_curve(anomaly_maps, ground_truth_masks)
    return trapezoid(fprs, pros, x_max=integration_limit) / integration_limit


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "anomalous" if n_neg == 0 else "normal"
        raise ValueError(f"ROC AUC needs both normal and anomalous samples; all {positive.size} are {only}")
    ranks = rankdata(scores)  # average ranks for ties
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pixel_auroc(anomaly_maps: Sequence[np.ndarray], ground_truth_masks: Sequence[np.ndarray]) -> float:
    """Pixel-level ROC AUC over all pixels of all images (anomalous pixels are the positives)."""
    maps, masks = _check_pairs(anomaly_maps, ground_truth_masks)
    scores = np.concatenate([m.ravel() for m in maps])
    positive = np.concatenate([m.ravel() for m in masks])
    return _auroc(scores, positive)


def image_auroc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """Image-level ROC AUC; ``labels`` are 1/True for anomalous images, 0/False for good ones."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1-D of equal length, got shapes {scores.shape} and {labels.shape}"
        )
    if not np.issubdtype(scores.dtype, np.number) or not np.isfinite(scores).all():
        raise ValueError("image scores must be finite real numbers")
    if labels.dtype != bool:
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"labels must be 0/1 or bool; label {i} is {labels[i].item()!r}")
        labels = labels == 1
    return _auroc(scores, labels)
