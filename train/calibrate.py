"""Decision thresholds from validation good images only (defects are never shown).

pixel: the (1 − pixel_fpr) quantile of all valid validation pixels: a pixel false-positive rate
of ``pixel_fpr`` on good parts.

image: the k-th largest validation image score for a false-reject target α, k = ⌊α(n+1)⌋
(``edgestad.image_threshold``: the rule, what n images can promise, and why a target below
1/(n+1) is widened loudly). The validation scores are stored so that ``edgestad thresholds`` can
move the threshold without retraining. ``review_false_reject`` adds a review band: a lower image
threshold at that larger rate (scores between the two are REVIEW).
"""
from __future__ import annotations

import numpy as np
import torch

from edgestad.image_threshold import rank_threshold, widened_warning


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
                   image_false_reject: float = 0.05, boxes: np.ndarray | None = None,
                   review_false_reject: float | None = None) -> dict:
    pixels = valid_pixels(val_maps, boxes)
    pixel = float(np.quantile(pixels, 1.0 - pixel_fpr))
    fprs = sorted(set(PIXEL_FPR_GRID) | {float(pixel_fpr)})
    quantiles = {"fpr": fprs, "value": [float(np.quantile(pixels, 1.0 - f)) for f in fprs],
                 "pixels": int(pixels.size)}
    scores = np.asarray(val_scores, dtype=np.float64)
    mu, sigma = float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    image = rank_threshold(scores, image_false_reject)
    out = {"pixel": pixel, "image": float(image["threshold"]),
           "rule": {"pixel": f"quantile {1 - pixel_fpr:g} of validation good pixels",
                    "pixel_fpr": pixel_fpr, "image": image["rule"],
                    "image_false_reject": image_false_reject,
                    "image_promised_false_reject": image["promised"],
                    "image_target_widened": image["widened"],
                    "validation_score_mean": mu, "validation_score_std": sigma,
                    "validation_score_max": float(scores.max()),
                    "validation_scores": sorted(float(v) for v in scores),
                    "validation_images": int(len(scores)),
                    "validation_pixel_quantiles": quantiles}}
    out["warnings"] = [w for w in [widened_warning(image)] if w]
    if review_false_reject is not None:
        # the band starts at least one rank below the NG threshold
        review = rank_threshold(scores, review_false_reject, "--review-false-reject",
                                min_k=image["k"] + 1)
        out["image_review"] = float(review["threshold"])
        out["rule"].update(image_review=review["rule"], review_false_reject=review_false_reject,
                           review_promised_false_reject=review["promised"])
        out["warnings"] += [w for w in [widened_warning(review, "--review-false-reject")] if w]
    return out
