"""The global branch and the fused image score, for the pretrained-feature methods.

A local map (student vs teacher, per position) misses defects that change a part as a whole: an
uneven finish, a wrong shade, a missing large region whose every patch looks normal on its own.
The global branch scores each image by how far its teacher's *spatially pooled* features lie from
those of the good training images: per level, the Mahalanobis distance under a Gaussian fitted to
the pooled features of the good training images with Ledoit–Wolf shrinkage (Rippel et al., ICPR
2020, "Modeling the distribution of normal data in pre-trained deep features"; the same idea as
DFM). Nothing is trained: the mean and the shrunk precision matrix per level are fitted at train
time (``fit_global_gaussian``), stored as buffers and run inside the graph (mean pooling, one
matrix product per level), float32 in every precision.

Fusion (``ScoreFusion``): the map score and the global score are each normalised on the
validation good images (never on defects), then combined:

- normalisation ``quantile`` (EfficientAD's): (s − q₀.₉) / (q₀.₉₉₅ − q₀.₉) · 0.1, so a typical
  good part scores ≤ 0 and the far tail of the good parts 0.1;
- normalisation ``z``: (s − mean) / std of the validation scores;
- rule ``sum``: the two normalised scores added (a part must look normal both ways);
- rule ``max``: the larger of the two (either view alone can reject).

The branch is on by default (``global_branch``), its levels are ``global_levels`` (network
strides of the teacher); ``README`` / studies/results/decisions say how the defaults were
chosen on bottle, screw and magnetic_tile together.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F



def pooled(features: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """N×C×h×w → N×C: the mean over positions (over the valid region's share of each position
    for letterboxed inputs; ``valid`` N×1×H×W at the input resolution)."""
    if valid is None:
        return features.mean(dim=(2, 3))
    stride = valid.shape[-1] // features.shape[-1]
    weight = F.avg_pool2d(valid.to(features.dtype), kernel_size=stride, stride=stride)
    total = weight.sum(dim=(2, 3)).clamp_min(1e-6)
    return (features * weight).sum(dim=(2, 3)) / total


class GlobalGaussian(nn.Module):
    """Per level: d_l = sqrt((f − μ_l)ᵀ P_l (f − μ_l)) of the pooled features f; score Σ_l d_l."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.levels = len(channels)
        for i, c in enumerate(channels):
            self.register_buffer(f"mean{i}", torch.zeros(c))
            self.register_buffer(f"precision{i}", torch.eye(c))

    def distances(self, features: list[torch.Tensor], valid: torch.Tensor | None) -> torch.Tensor:
        """N × levels Mahalanobis distances."""
        out = []
        for i, f in enumerate(features):
            d = pooled(f.float(), valid) - getattr(self, f"mean{i}")
            m = (torch.matmul(d, getattr(self, f"precision{i}")) * d).sum(dim=1)
            out.append(m.clamp_min(0.0).sqrt())
        return torch.stack(out, dim=1)

    def forward(self, features: list[torch.Tensor], valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.distances(features, valid).sum(dim=1)


class ScoreFusion(nn.Module):
    """(map score, global score) → one image score, each normalised on validation good images.

    ``norm`` holds (map offset, map scale, global offset, global scale): s ↦ (s − offset) / scale.
    """

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule
        self.register_buffer("norm", torch.tensor([0.0, 1.0, 0.0, 1.0]))

    def forward(self, map_score: torch.Tensor, global_score: torch.Tensor) -> torch.Tensor:
        a = (map_score - self.norm[0]) / self.norm[1]
        b = (global_score - self.norm[2]) / self.norm[3]
        return a + b if self.rule == "sum" else torch.maximum(a, b)


def normalization_of(scores: np.ndarray, kind: str) -> tuple[float, float]:
    """(offset, scale) of validation good scores: EfficientAD's quantiles or mean/std. A scale
    the scores cannot give (one validation image, or all equal) falls back to the offset's size,
    so a tiny validation set never blows the fused score up."""
    scores = np.asarray(scores, dtype=np.float64)
    if kind == "quantile":
        qa, qb = np.quantile(scores, 0.9), np.quantile(scores, 0.995)
        offset, scale = float(qa), float(qb - qa) / 0.1
    else:
        offset, scale = float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    size = float(np.abs(scores).mean())
    if not scale > 1e-6 * max(size, 1e-30):
        scale = size or 1.0
    return offset, scale


def fused_scores(map_scores, global_scores, norm, rule: str) -> np.ndarray:
    """The graph's ScoreFusion in numpy (evaluate and the benchmarks use it)."""
    a = (np.asarray(map_scores, np.float64) - norm[0]) / norm[1]
    b = (np.asarray(global_scores, np.float64) - norm[2]) / norm[3]
    return a + b if rule == "sum" else np.maximum(a, b)


def mahalanobis(pooled_features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """The graph's GlobalGaussian distance of one level in numpy (float64): N×C pooled features
    → N distances (the studies fit and compare Gaussians with it)."""
    d = np.asarray(pooled_features, dtype=np.float64) - mean
    return np.sqrt(np.maximum((d @ precision * d).sum(1), 0))


def fit_gaussian(pooled_features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, precision, shrinkage) of N×C pooled features: Ledoit–Wolf (scikit-learn)."""
    from sklearn.covariance import LedoitWolf
    estimate = LedoitWolf().fit(np.asarray(pooled_features, dtype=np.float64))
    return estimate.location_, estimate.precision_, float(estimate.shrinkage_)


@torch.no_grad()
def fit_global_branch(model, train: torch.Tensor, train_boxes: torch.Tensor | None,
                      val: torch.Tensor, val_boxes: torch.Tensor | None, device,
                      batch_size: int = 8) -> dict:
    """Fit the global branch of a trained model: the Gaussian per level on the pooled teacher
    features of the good *training* images, then the fusion's normalisation on the *validation*
    good images' map and global scores (images uint8 N×3×H×W, boxes N×4 or None). Returns what
    the manifest records."""
    model.eval().to(device)
    per_level: list[list[np.ndarray]] = [[] for _ in model.config.global_levels]
    for start in range(0, len(train), batch_size):
        x = model.normalize_input(train[start:start + batch_size].to(device))
        box = None if train_boxes is None else train_boxes[start:start + batch_size].to(device)
        valid = None if box is None else model.valid_mask(box)
        _, features = model.map_and_features(x)
        for i, f in enumerate(features):
            per_level[i].append(pooled(f.float(), valid).cpu().numpy())
    gaussian = model.global_gaussian
    shrinkage = []
    for i, chunks in enumerate(per_level):
        mean, precision, amount = fit_gaussian(np.concatenate(chunks))
        getattr(gaussian, f"mean{i}").copy_(torch.from_numpy(mean).float())
        getattr(gaussian, f"precision{i}").copy_(torch.from_numpy(precision).float())
        shrinkage.append(round(amount, 4))
    map_scores, global_scores = validation_score_parts(model, val, val_boxes, device, batch_size)
    kind = model.config.score_normalization
    norm = normalization_of(map_scores, kind) + normalization_of(global_scores, kind)
    model.score_fusion.norm.copy_(torch.tensor(norm, dtype=torch.float32))
    return {"levels": list(model.config.global_levels), "train_images": int(len(train)),
            "ledoit_wolf_shrinkage": shrinkage,
            "fusion": {"rule": model.config.score_fusion, "normalization": kind,
                       "map": {"offset": norm[0], "scale": norm[1]},
                       "global": {"offset": norm[2], "scale": norm[3]},
                       "validation_images": int(len(val))}}


@torch.no_grad()
def validation_score_parts(model, images: torch.Tensor, boxes: torch.Tensor | None, device,
                           batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(map scores, global scores) of uint8 N×3×H×W images."""
    maps, globals_ = [], []
    for start in range(0, len(images), batch_size):
        box = None if boxes is None else boxes[start:start + batch_size].to(device)
        _, m, g = model.scores(images[start:start + batch_size].to(device), box)
        maps.append(m.float().cpu().numpy())
        globals_.append(g.float().cpu().numpy())
    return np.concatenate(maps), np.concatenate(globals_)
