"""``--augment auto``: do the good parts lie at any angle? Decided from the training images.

Per image, the dominant orientation θ and its coherence c come from the gradient structure tensor
of the whole (valid) image, J = Σ ∇I ∇Iᵀ: θ = ½·atan2(2J_xy, J_xx − J_yy),
c = √((J_xx − J_yy)² + 4J_xy²) / (J_xx + J_yy). Over the training set, the coherence-weighted
resultant R = |Σ c·e^{2iθ}| / Σ c is near 1 when the parts share one orientation and near 0 when
they lie at any angle. ``rotate`` is chosen when R < ROTATION_RESULTANT, else ``none``.

Measured on the dev categories (200 training images each, 256²): screw R = 0.07 (any rotation),
magnetic_tile 0.64, bottle 0.87 (studies/results/decisions/augment_auto.json).
"""
from __future__ import annotations

import cv2
import numpy as np

ROTATION_RESULTANT = 0.3


def orientation_resultant(images: np.ndarray, boxes: np.ndarray | None = None) -> tuple[float, float]:
    """(R, mean coherence) of uint8 N×H×W×3 images (valid boxes N×4 top, left, bottom, right)."""
    angles, weights = [], []
    for i, img in enumerate(images):
        if boxes is not None:
            top, left, bottom, right = (int(round(float(v))) for v in boxes[i])
            img = img[top:bottom, left:right]
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY).astype(np.float32)
        gray = cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA)
        gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0)
        gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1)
        jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
        angles.append(0.5 * np.arctan2(2 * jxy, jxx - jyy))
        weights.append(np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-9))
    a, w = np.asarray(angles), np.asarray(weights)
    if w.sum() <= 0:
        return 1.0, 0.0
    return float(abs((w * np.exp(2j * a)).sum()) / w.sum()), float(w.mean())


def choose_augmentation(images: np.ndarray, boxes: np.ndarray | None = None,
                        otherwise: str = "none") -> tuple[str, str]:
    """("rotate" or ``otherwise`` (the method's own default), why) for ``--augment auto``."""
    resultant, coherence = orientation_resultant(images, boxes)
    if resultant < ROTATION_RESULTANT:
        return "rotate", (f"the training parts lie at varied angles (orientation resultant "
                          f"{resultant:.2f} < {ROTATION_RESULTANT})")
    return otherwise, (f"the training parts share an orientation (orientation resultant "
                    f"{resultant:.2f} >= {ROTATION_RESULTANT})")
