"""What every method's model does after its anomaly map: letterbox masking and the image score.

``AnomalyModel`` is the base class of every method's ``nn.Module``: uint8 images (and, for
letterbox bundles, their valid boxes) → (anomaly map N×1×H×W, image score N). A method only
writes ``anomaly_map(x)`` for normalised images; input normalisation, the padding mask and the
image-score rule are here, once, and so are inside every exported graph.

Image-score rules (``image_score`` in each method's config):
- ``max``: the map's maximum (one pixel decides);
- ``topk:F``: the mean of the top F·H·W map values (e.g. ``topk:0.01`` = top 1 %), less
  sensitive to a single hot pixel. k is capped at 3840, TensorRT's TopK limit.
Both are computed over the valid (non-padding) pixels only, less a margin of ``score_margin``
pixels along the frame's (or the letterbox image's) edges when a config sets one: the map still
shows the edge, the image score does not count it.

Map smoothing (``map_sigma`` in a method's config, pixels of the model input; 0 = off): a
Gaussian blur of the anomaly map before the score, as PatchCore and PaDiM do (σ = 4 px for their
stride-8 features). It is a normalised convolution, blur(map·valid) / blur(valid), so padding
never leaks into the image's pixels and the borders are not darkened, and it is two separable
fixed-weight depthwise convolutions in the graph (module ``map_smoothing``, declared float32 for
the fp16 / int8 graphs by ``Method.fp32_modules``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .global_score import GlobalGaussian, ScoreFusion
from .settings import kernel_radius, parse_image_score

TRT_TOPK_LIMIT = 3840
_BIG = 3.0e38


def topk_count(fraction: float, height: int, width: int) -> int:
    return int(min(TRT_TOPK_LIMIT, max(1, round(fraction * height * width))))


def score_margin_of(config) -> int:
    """Pixels along the edges the image score ignores (0 for configs without the setting)."""
    return int(getattr(config, "score_margin", 0) or 0)


def describe_image_score(config) -> str:
    """What the graph's image score is, for a method config (or a bare rule string)."""
    rule = config if isinstance(config, str) else config.image_score
    kind, fraction = parse_image_score(rule)
    text = ("maximum of the anomaly map (valid pixels)" if kind == "max" else
            f"mean of the top {fraction:g} of the anomaly map's valid pixels")
    margin = 0 if isinstance(config, str) else score_margin_of(config)
    if margin:
        text += f", {margin} px from the edges"
    if not isinstance(config, str) and getattr(config, "global_branch", False):
        fuse = "sum" if config.score_fusion == "sum" else "maximum"
        text = (f"{fuse} of the {text} and the global Gaussian score of pooled teacher features "
                f"(strides {', '.join(map(str, config.global_levels))}), each normalised "
                f"({config.score_normalization}) on validation good images")
    return text


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


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``kernel_radius(sigma)``."""
    radius = kernel_radius(sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


class MapSmoothing(nn.Module):
    """Gaussian smoothing of an N×1×H×W map over its valid pixels (normalised convolution)."""

    def __init__(self, sigma: float):
        super().__init__()
        k = gaussian_kernel1d(sigma)
        self.radius = (len(k) - 1) // 2
        # Two channels (map·valid, valid) blurred by the same kernel: groups=2 depthwise convs.
        self.register_buffer("kernel_x", k.view(1, 1, 1, -1).repeat(2, 1, 1, 1), persistent=False)
        self.register_buffer("kernel_y", k.view(1, 1, -1, 1).repeat(2, 1, 1, 1), persistent=False)

    def forward(self, amap: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        weight = torch.ones_like(amap) if valid is None else valid.to(amap.dtype)
        both = torch.cat([amap * weight, weight], dim=1)
        both = F.conv2d(both, self.kernel_x, padding=(0, self.radius), groups=2)
        both = F.conv2d(both, self.kernel_y, padding=(self.radius, 0), groups=2)
        return both[:, 0:1] / both[:, 1:2].clamp_min(1e-6)


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
        sigma = float(getattr(self.config, "map_sigma", 0.0) or 0.0)
        self.map_smoothing = MapSmoothing(sigma) if sigma > 0 else None
        self.global_gaussian = self.score_fusion = None

    def init_global(self, teacher) -> None:
        """The global branch (``global_score.py``) over the teacher's (a FeaturePyramid's)
        features at ``config.global_levels``, when the config turns it on; its Gaussian and the
        fusion's normalisation are fitted at train time (``fit_global_branch``)."""
        if getattr(self.config, "global_branch", False):
            channels = {f.stride: f.channels for f in teacher.feature_info}
            self.global_gaussian = GlobalGaussian([channels[s] for s in self.config.global_levels])
            self.score_fusion = ScoreFusion(self.config.score_fusion)

    @property
    def has_global_branch(self) -> bool:
        return self.global_gaussian is not None

    @property
    def takes_valid_box(self) -> bool:
        return getattr(self.config, "resize", "area_or_linear") == "letterbox"

    def normalize_input(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.input_mean) / self.input_std

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images N×3×H×W → anomaly map N×1×H×W (the method's own part)."""
        raise NotImplementedError

    def map_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(anomaly map, the teacher's features at ``config.global_levels``): a method with a
        global branch overrides this so that its map and the branch share one teacher pass."""
        return self.anomaly_map(x), []

    def valid_mask(self, valid_box: torch.Tensor) -> torch.Tensor:
        """N×4 (top, left, bottom, right) → N×1×H×W bool."""
        box = valid_box.float().view(-1, 4, 1, 1)
        top, left, bottom, right = box[:, 0:1], box[:, 1:2], box[:, 2:3], box[:, 3:4]
        rows = (self.pixel_rows >= top) & (self.pixel_rows < bottom)
        cols = (self.pixel_cols >= left) & (self.pixel_cols < right)
        return rows & cols

    @property
    def score_margin(self) -> int:
        """Pixels along the edges the image score ignores (read from the config at each call:
        a study may change the config of a built model)."""
        return score_margin_of(self.config)

    def scored_region(self, valid_box: torch.Tensor | None) -> torch.Tensor | None:
        """The pixels the image score counts: the valid ones (all, without a box) less
        ``score_margin`` pixels along their edges; None = every pixel."""
        margin = self.score_margin
        if margin == 0:
            return None if valid_box is None else self.valid_mask(valid_box)
        if valid_box is None:
            h, w = self.config.input_size
            valid_box = torch.tensor([[0, 0, h, w]], dtype=torch.float32, device=self.pixel_rows.device)
        inset = torch.tensor([margin, margin, -margin, -margin], dtype=torch.float32,
                             device=self.pixel_rows.device)
        return self.valid_mask(valid_box.float() + inset)

    def finish(self, amap: torch.Tensor, valid_box: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Smooth (``map_sigma``), mask the padding (set to the image's lowest valid value) and
        apply the score rule over the scored region (``scored_region``)."""
        if valid_box is None:
            if self.map_smoothing is not None:
                amap = self.map_smoothing(amap)
            return amap, image_score(amap, self.config.image_score, self.scored_region(None))
        valid = self.valid_mask(valid_box)
        if self.map_smoothing is not None:
            amap = self.map_smoothing(amap, valid)
        lowest = torch.where(valid, amap, torch.full_like(amap, _BIG)).amin(dim=(1, 2, 3), keepdim=True)
        amap = torch.where(valid, amap, lowest)
        region = self.scored_region(valid_box) if self.score_margin else valid   # mask made once
        return amap, image_score(amap, self.config.image_score, region)

    def scores(self, images: torch.Tensor, valid_box: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(anomaly map, map score, global score or None): the parts of the image score, for
        fitting the fusion and for ``evaluate``'s report of each one's contribution."""
        x = self.normalize_input(images)
        if not self.has_global_branch:
            amap, map_score = self.finish(self.anomaly_map(x), valid_box)
            return amap, map_score, None
        amap, features = self.map_and_features(x)
        amap, map_score = self.finish(amap, valid_box)
        valid = None if valid_box is None else self.valid_mask(valid_box)
        return amap, map_score, self.global_gaussian(features, valid)

    def forward(self, images: torch.Tensor, valid_box: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """images N×3×H×W (0..255, uint8 or float) → (anomaly_map N×1×H×W, image_score N):
        the map score, fused with the global score when the branch is on."""
        amap, map_score, global_score = self.scores(images, valid_box)
        if global_score is None:
            return amap, map_score
        return amap, self.score_fusion(map_score, global_score)
