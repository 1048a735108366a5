"""Heat-map overlays of anomaly maps for evaluation reports (OpenCV only, no torch)."""
from __future__ import annotations

import cv2
import numpy as np


def overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, low: float, high: float,
            mask: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """Image | image with the map as a heat map (fixed scale low..high) and the ground truth
    outlined in white, side by side (RGB uint8)."""
    norm = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    blended = cv2.addWeighted(image_rgb, 1 - alpha, heat, alpha, 0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(blended, contours, -1, (255, 255, 255), 1)
    return np.concatenate([image_rgb, blended], axis=1)
