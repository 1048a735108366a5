"""What every method's model does after its anomaly map: letterbox masking and the image score.

``AnomalyModel`` is the base class of every method's ``nn.Module``: uint8 images (and, for
letterbox bundles, their valid boxes) → (anomaly map N×1×H×W, image score N). A method only
writes ``anomaly_map(x)`` for normalised images; input normalisation, the padding mask and the
image-score rule are here, once, and so are inside every exported graph.

Image-score rules (``image_score`` in each method's config):
- ``max``: the map's maximum (one pixel decides);
- ``topk:F``: the mean of the top F·H·W map values (e.g. ``topk:0.01`` = top 1 %), less
  sensitive to a single hot pixel. k is capped at 3840, TensorRT's TopK limit.
Both are computed over the valid (non-padding) pixels only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

TRT_TOPK_LIMIT = 3840
_BIG = 3.0e38


def parse_image_score(rule: str) -> tuple[str, float]:
    """('max', 0) or ('topk', fraction); ValueError naming the rule otherwise."""
    if rule == "max":
        return "max", 0.0
    if isinstance(rule, str) and rule.startswith("topk:"):
        try:
            fraction = float(rule.split(":", 1)[1])
        except ValueError:
            fraction = -1.0
        if 0.0 < fraction <= 1.0:
            return "topk", fraction
    raise ValueError(f"image score rule {rule!r}: use 'max' or 'topk:F' with 0 < F <= 1 "
                     "(mean of the top F of the map's pixels)")


def topk_count(fraction: float, height: int, width: int) -> int:
    return int(min(TRT_TOPK_LIMIT, max(1, round(fraction * height * width))))


def describe_image_score(rule: str) -> str:
    kind, fraction = parse_image_score(rule)
    if kind == "max":
        return "maximum of the anomaly map (valid pixels)"
    return f"mean of the top {fraction:g} of the anomaly map's valid pixels"


def image_score(amap: torch.Tensor, rule: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """amap N×1×H×W, valid N×1×H×W bool (None: all) → N."""
    kind, fraction = parse_image_score(rule)
    n, _, h, w = amap.shape
    masked = amap if valid is None else torch.where(valid, amap, torch.full_like(amap, -_BIG))
    flat = masked.reshape(n, h * w)
    if kind == "max":
        return flat.amax(dim=1)
    top = torch.topk(flat, topk_count(fraction, h, w), dim=1).values
    if valid is None:
        return top.mean(dim=1)
    # Letterbox: average only the top values that are image pixels (an image with fewer valid
    # pixels than k must not average padding in).
    real = top > -_BIG
    return torch.where(real, top, torch.zeros_like(top)).sum(dim=1) / real.sum(dim=1).clamp_min(1)


class AnomalyModel(nn.Module):
    """Base of every method's model. Subclasses set ``self.config`` (with ``input_size``,
    ``image_score``, ``resize``), call ``init_input(mean, std)`` and write ``anomaly_map``."""

    config: object

    def init_input(self, mean, std) -> None:
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        h, w = self.config.input_size
        # Pixel row/column indices for the letterbox mask (constants in the graph, not weights).
        self.register_buffer("pixel_rows", torch.arange(h, dtype=torch.float32).view(1, 1, h, 1),
                             persistent=False)
        self.register_buffer("pixel_cols", torch.arange(w, dtype=torch.float32).view(1, 1, 1, w),
                             persistent=False)

    @property
    def takes_valid_box(self) -> bool:
        return getattr(self.config, "resize", "area_or_linear") == "letterbox"

    def normalize_input(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.input_mean) / self.input_std

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images N×3×H×W → anomaly map N×1×H×W (the method's own part)."""
        raise NotImplementedError

    def valid_mask(self, valid_box: torch.Tensor) -> torch.Tensor:
        """N×4 (top, left, bottom, right) → N×1×H×W bool."""
        box = valid_box.float().view(-1, 4, 1, 1)
        top, left, bottom, right = box[:, 0:1], box[:, 1:2], box[:, 2:3], box[:, 3:4]
        rows = (self.pixel_rows >= top) & (self.pixel_rows < bottom)
        cols = (self.pixel_cols >= left) & (self.pixel_cols < right)
        return rows & cols

    def finish(self, amap: torch.Tensor, valid_box: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask the padding (set to the image's lowest valid value) and apply the score rule."""
        if valid_box is None:
            return amap, image_score(amap, self.config.image_score)
        valid = self.valid_mask(valid_box)
        lowest = torch.where(valid, amap, torch.full_like(amap, _BIG)).amin(dim=(1, 2, 3), keepdim=True)
        amap = torch.where(valid, amap, lowest)
        return amap, image_score(amap, self.config.image_score, valid)

    def forward(self, images: torch.Tensor, valid_box: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """images N×3×H×W (0..255, uint8 or float) → (anomaly_map N×1×H×W, image_score N)."""
        return self.finish(self.anomaly_map(self.normalize_input(images)), valid_box)
