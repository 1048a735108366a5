"""The one batch loop for a torch model (image batch -> maps, scores), and the device choice.

Used by training (the validation scores its thresholds come from, train/fit.py), ``evaluate --backend torch``, export's parity check and
bench's torch backend. Imports torch, so torch-free code (the runtime, edgestad.runner) never
imports this module.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def choose_device(name: str) -> str:
    """A ``--device`` value: ``auto`` is ``cuda`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        import click
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    return name


def batches(images, boxes=None, batch_size: int = 4, device="cpu"
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, boxes or None) on ``device``, ``batch_size`` at a time; numpy or torch input."""
    for start in range(0, len(images), batch_size):
        part = torch.as_tensor(images[start:start + batch_size]).to(device)
        box = None if boxes is None else torch.as_tensor(boxes[start:start + batch_size]).to(device)
        yield part, box


def run_model(model, images, boxes=None, batch_size: int = 4, device="cpu"
              ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 3 x H x W [+ valid boxes N x 4] -> (maps float32 N x H x W, scores float32 N).
    The model gets the boxes only when they are given (a peer model takes images alone)."""
    maps, scores = [], []
    with torch.no_grad():
        for part, box in batches(images, boxes, batch_size, device):
            out_map, out_score = model(part) if box is None else model(part, box)
            maps.append(out_map[:, 0].float().cpu().numpy())
            scores.append(out_score.float().cpu().numpy())
    if len(maps) == 1:
        return maps[0], scores[0]
    return np.concatenate(maps), np.concatenate(scores)
