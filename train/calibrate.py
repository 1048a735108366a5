"""Decision thresholds from validation good images only (defects are never shown).

pixel: the (1 − pixel_fpr) quantile of all valid validation pixels: a pixel false-positive rate
of ``pixel_fpr`` on good parts.

image: a false-reject target fitted to the validation image scores. The scores of good parts are
modelled as a normal distribution (mean and standard deviation of the validation scores) and the
threshold is its (1 − false_reject) quantile, μ + z·σ. Unlike "the largest validation score",
it does not sit on one extreme value of a few dozen images, and the target says what it means:
the share of good parts expected to be rejected. ``false_reject = 0`` keeps the old rule (the
largest validation score).
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch


@torch.no_grad()
def predict(model, images: torch.Tensor, device, batch_size: int = 4, boxes=None):
    """(maps N×H×W float32, image scores N) for uint8 N×3×H×W images (and valid boxes)."""
    model.eval().to(device)
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        box = None if boxes is None else boxes[start:start + batch_size].to(device)
        m, s = model(images[start:start + batch_size].to(device), box)
        maps.append(m[:, 0].float().cpu().numpy())
        scores.append(s.float().cpu().numpy())
    return np.concatenate(maps), np.concatenate(scores)


def valid_pixels(maps: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    if boxes is None:
        return maps.reshape(-1)
    parts = []
    for amap, box in zip(maps, boxes):
        top, left, bottom, right = (int(round(float(v))) for v in box)
        parts.append(amap[top:bottom, left:right].reshape(-1))
    return np.concatenate(parts)


# Pixel false-positive rates (1, 2, 3, 5 per decade, 1e-5 .. 0.5) at which the validation pixel
# quantiles are stored, so that `edgestad thresholds --pixel-fpr` can recompute the pixel
# threshold without retraining (exact at these and the trained rate, log-linear between).
PIXEL_FPR_GRID = tuple(float(f"{m}e{e}") for e in range(-5, 0) for m in (1, 2, 3, 5))


def fit_thresholds(val_maps: np.ndarray, val_scores: np.ndarray, pixel_fpr: float = 0.001,
                   image_false_reject: float = 0.01, boxes: np.ndarray | None = None) -> dict:
    pixels = valid_pixels(val_maps, boxes)
    pixel = float(np.quantile(pixels, 1.0 - pixel_fpr))
    fprs = sorted(set(PIXEL_FPR_GRID) | {float(pixel_fpr)})
    quantiles = {"fpr": fprs, "value": [float(np.quantile(pixels, 1.0 - f)) for f in fprs],
                 "pixels": int(pixels.size)}
    scores = np.asarray(val_scores, dtype=np.float64)
    mu, sigma = float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    if image_false_reject > 0:
        z = NormalDist().inv_cdf(1.0 - image_false_reject)
        image = mu + z * sigma
        image_rule = (f"normal fit to validation good image scores: mean + {z:.3f}·std "
                      f"(false-reject target {image_false_reject:g})")
    else:
        image, z = float(scores.max()), None
        image_rule = "largest validation good image score"
    return {"pixel": pixel, "image": float(image),
            "rule": {"pixel": f"quantile {1 - pixel_fpr:g} of validation good pixels",
                     "pixel_fpr": pixel_fpr, "image": image_rule,
                     "image_false_reject": image_false_reject,
                     "validation_score_mean": mu, "validation_score_std": sigma,
                     "validation_score_max": float(scores.max()),
                     "validation_images": int(len(scores)),
                     "validation_pixel_quantiles": quantiles}}
