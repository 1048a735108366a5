"""Calibration on validation good images: score statistics (eq. 11) and decision thresholds."""
from __future__ import annotations

import numpy as np
import torch

from edgestad.models.uninformed_students import UninformedStudents


@torch.no_grad()
def fit_score_stats(model: UninformedStudents, images: torch.Tensor, device,
                    batch_size: int = 4) -> dict:
    """Mean and std of e and v over all (sampled) pixels of the validation good images."""
    model.eval().to(device)
    stats = {}
    for p in model.config.patch_sizes:
        acc = np.zeros(4)          # sum e, sum e², sum v, sum v²
        count = 0
        for start in range(0, len(images), batch_size):
            x = model.normalize_input(images[start:start + batch_size].to(device))
            e, v = model.error_and_variance(x, p)
            e, v = e.double(), v.double()
            acc += [float(e.sum()), float((e ** 2).sum()), float(v.sum()), float((v ** 2).sum())]
            count += e.numel()
        e_mean, v_mean = acc[0] / count, acc[2] / count
        e_std = max(np.sqrt(max(acc[1] / count - e_mean ** 2, 0.0)), 1e-12)
        v_std = max(np.sqrt(max(acc[3] / count - v_mean ** 2, 0.0)), 1e-12)
        getattr(model, f"score_stats_{p}").copy_(torch.tensor([e_mean, e_std, v_mean, v_std]))
        stats[str(p)] = {"e_mean": e_mean, "e_std": e_std, "v_mean": v_mean, "v_std": v_std}
    return stats


@torch.no_grad()
def predict(model: UninformedStudents, images: torch.Tensor, device, batch_size: int = 4):
    """(maps N×H×W float32, image scores N) for uint8 N×3×H×W images."""
    model.eval().to(device)
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        m, s = model(images[start:start + batch_size].to(device))
        maps.append(m[:, 0].float().cpu().numpy())
        scores.append(s.float().cpu().numpy())
    return np.concatenate(maps), np.concatenate(scores)


def fit_thresholds(val_maps: np.ndarray, val_scores: np.ndarray, pixel_fpr: float = 0.001,
                   image_fpr: float = 0.0) -> dict:
    """Thresholds from anomaly-free validation images only (defects are never shown).

    pixel: the (1 − pixel_fpr) quantile of all validation pixel scores, i.e. a pixel false
    positive rate of pixel_fpr on good parts. image: the (1 − image_fpr) quantile of validation
    image scores (image_fpr = 0 → the largest: every validation good image passes as OK).
    The image score is the maximum of the anomaly map.
    """
    pixel = float(np.quantile(val_maps, 1.0 - pixel_fpr))
    image = float(np.quantile(val_scores, 1.0 - image_fpr))
    return {"pixel": pixel, "image": image,
            "rule": {"pixel": f"quantile {1 - pixel_fpr:g} of validation good pixels",
                     "pixel_fpr": pixel_fpr,
                     "image": f"quantile {1 - image_fpr:g} of validation good image scores",
                     "image_fpr": image_fpr, "image_score": "max of the anomaly map",
                     "validation_images": int(len(val_scores))}}
