"""Uninformed Students (Bergmann et al., CVPR 2020) as one module: image batch → (map, score).

Everything the deployed graph needs is inside ``forward``: input normalisation, the teacher and all
students of every scale in their fast dense form, descriptor normalisation, regression error e and
predictive variance v (eq. 8-10), their normalisation by validation statistics, the multi-scale
average (eq. 12) and the upsampling to input resolution. Export is then method-agnostic.
The letterbox mask and the image-score rule come from ``AnomalyModel`` (methods/common/scoring.py).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common.scoring import AnomalyModel
from . import UninformedStudentsConfig
from .patchnet import PatchNet, num_poolings, samples_covering


def ensemble_error_and_variance(target: torch.Tensor, preds: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression error e (eq. 9) and predictive variance v (eq. 10), N×h×w each, from the
    normalised teacher descriptors (N×d×h×w) and the students' predictions (M×N×d×h×w)."""
    mean_pred = preds.mean(0)
    error = ((mean_pred - target) ** 2).sum(1)
    # Variance as the mean squared deviation from the ensemble mean: the same value as
    # E[||μ_i||²] − ||μ||² without its cancellation in low precision.
    variance = ((preds - mean_pred) ** 2).sum(2).mean(0)
    return error, variance


class StudentTeacherScoring(AnomalyModel):
    """Scoring shared by the separate (``UninformedStudents``) and the fused
    (``fused.FusedUninformedStudents``) forms: eq. 11, the multi-scale average (eq. 12) and the
    upsampling. Subclasses provide ``config``, the input buffers (``init_input``), the
    ``score_stats_<p>`` buffers and ``error_and_variance(x, p)``."""

    config: UninformedStudentsConfig

    def error_and_variance(self, x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def scale_score(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """Normalised e + normalised v for one scale (eq. 11), on the sampled grid."""
        e, v = self.error_and_variance(x, p)
        stats = getattr(self, f"score_stats_{p}")
        return (e - stats[0]) / stats[1] + (v - stats[2]) / stats[3]

    def upsample(self, score_grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Sampled map (N×h×w, samples every s px from pixel 0) → N×1×H×W."""
        s = self.config.dense_stride
        grid = score_grid[:, None]
        if s == 1:
            return grid
        size = ((grid.shape[-2] - 1) * s + 1, (grid.shape[-1] - 1) * s + 1)
        full = F.interpolate(grid, size=size, mode="bilinear", align_corners=True)
        return full[..., :height, :width]

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images → the multi-scale average of eq. 11's scores (eq. 12), N×1×H×W."""
        height, width = x.shape[-2:]
        total = None
        for p in self.config.patch_sizes:
            score = self.scale_score(x, p)
            total = score if total is None else total + score
        multi_scale_average = total / len(self.config.patch_sizes)
        return self.upsample(multi_scale_average, height, width)


class UninformedStudents(StudentTeacherScoring):
    """Teacher + M students per scale. Input: N×3×H×W RGB, values 0..255 (uint8 or float)."""

    def __init__(self, config: UninformedStudentsConfig):
        super().__init__()
        self.config = config
        c = config
        for p in c.patch_sizes:   # fail before training, not at the first dense pass after it
            if c.dense_stride > 2 ** num_poolings(p):
                raise ValueError(f"dense_stride {c.dense_stride} is larger than the total stride "
                                 f"{2 ** num_poolings(p)} of the p={p} network; use a dense "
                                 f"stride ≤ {2 ** num_poolings(p)} or leave out p={p}")

        def net(p: int) -> PatchNet:
            return PatchNet(p, c.descriptor_dim, c.width, c.leaky_slope)

        self.teachers = nn.ModuleDict({str(p): net(p) for p in c.patch_sizes})
        self.students = nn.ModuleDict(
            {str(p): nn.ModuleList(net(p) for _ in range(c.num_students)) for p in c.patch_sizes})
        self.init_input(c.mean, c.std)
        for p in c.patch_sizes:
            # Per-channel statistics of the teacher's descriptors on the training images (§3.2).
            self.register_buffer(f"descriptor_mean_{p}", torch.zeros(1, c.descriptor_dim, 1, 1))
            self.register_buffer(f"descriptor_std_{p}", torch.ones(1, c.descriptor_dim, 1, 1))
            # e_mean, e_std, v_mean, v_std on the validation good images (eq. 11).
            self.register_buffer(f"score_stats_{p}", torch.tensor([0.0, 1.0, 0.0, 1.0]))

    # --- pieces -------------------------------------------------------------------------------
    def descriptor_stats(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"descriptor_mean_{p}"), getattr(self, f"descriptor_std_{p}")

    def teacher_descriptors(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """Normalised dense teacher descriptors (the students' regression target)."""
        mean, std = self.descriptor_stats(p)
        t = self.teachers[str(p)].dense(x, self.config.dense_stride, self.config.padding_mode)
        return (t - mean) / std

    def error_and_variance(self, x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Regression error e (eq. 9) and predictive variance v (eq. 10), N×h×w each."""
        target = self.teacher_descriptors(x, p)
        preds = torch.stack([s.dense(x, self.config.dense_stride, self.config.padding_mode)
                             for s in self.students[str(p)]])          # M×N×d×h×w
        return ensemble_error_and_variance(target, preds)

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        s = self.config.dense_stride
        return samples_covering(height, s), samples_covering(width, s)


def scale_parts(model: UninformedStudents, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"p17": map, ...}: each scale's normalised score upsampled to the input."""
    h, w = x.shape[-2:]
    return {f"p{p}": model.upsample(model.scale_score(x, p), h, w) for p in model.config.patch_sizes}


@torch.no_grad()
def fit_score_stats(model: UninformedStudents, images: torch.Tensor, boxes, device,
                    batch_size: int = 4) -> dict:
    """Mean and std of e and v over all (sampled) pixels of the validation good images (eq. 11;
    a letterbox's padding included, as the statistics were defined)."""
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
