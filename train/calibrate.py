"""The trained model's maps and image scores on the validation good images, from which training
fits its thresholds (the rules: ``edgestad/thresholds.py``).
"""
from __future__ import annotations

import torch

from edgestad.torch_loop import run_model


def predict(model, images: torch.Tensor, device, batch_size: int = 4, boxes=None):
    """(maps N×H×W float32, image scores N) for uint8 N×3×H×W images (and valid boxes)."""
    model.eval().to(device)
    return run_model(model, images, boxes, batch_size, device)
