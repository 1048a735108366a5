"""ResNet-18 teacher, CNN students: the student-teacher study whose teacher is a pretrained
ResNet-18 cut before its last five children (conv1, bn1, relu, maxpool, layer1: 64 × 128 × 128
features for a 512² input) and whose students are small networks of convolutions and max-poolings
only, each mapping the image to the teacher's feature shape.

- teacher: ResNet-18 up to layer1 (``--backbone resnet18 --backbone-weights FILE``); offline,
  EfficientNet-Lite0 up to its stride-4 stage (24 channels), the same resolution;
- students (``num_students``, default 3): conv3×3 + ReLU stacks with two 2×2 max-poolings, a final
  1×1 convolution to the teacher's channels, random init;
- loss: mean squared error to the teacher's features, summed over students;
- map: mean over students and channels of the squared difference, upsampled (bilinear) to the
  input, normalised to [0, 1] by the minimum and maximum over the validation good images' pixels
  (``normalization="validation"``). The study's per-image min–max (``"per_image"``) is available
  but maps every image's maximum to 1, which erases the image score (image AUROC ≈ 0.5);
- Adam 1e-3, random horizontal flip. The study trains at 512² for 100 epochs at batch 1; the CPU
  default here is 256² and a few epochs at batch 8 (README says what was used).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import FitContext
from ..common.backbones import PRETRAINED, FeaturePyramid, describe_weights
from ..common.scoring import AnomalyModel
from ..common.training import Stage, TrainingLoop, augment_batch, nchw
from . import ResNetStudentsConfig


def conv_student(out_channels: int, channels: tuple[int, ...]) -> nn.Sequential:
    """Convolutions and max-poolings only: stride 4 overall, like the teacher's features."""
    a, b, c = channels
    return nn.Sequential(
        nn.Conv2d(3, a, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(a, b, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(b, b, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(b, c, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c, out_channels, 1))


class ResNetStudents(AnomalyModel):
    def __init__(self, config: ResNetStudentsConfig):
        super().__init__()
        self.config = config
        # stride 4 for the map; the global branch's levels too when it is on
        self.teacher = FeaturePyramid(config.backbone, config.teacher_strides((4,)))
        self.teacher.requires_grad_(False)
        channels = self.teacher.feature_info[0].channels
        self.students = nn.ModuleList(conv_student(channels, tuple(config.student_channels))
                                      for _ in range(config.num_students))
        self.init_input(self.teacher.mean, self.teacher.std)
        self.init_global(self.teacher)
        # min and max of the raw map over the validation good pixels (set by fit_score_statistics)
        self.register_buffer("map_range", torch.tensor([0.0, 1.0]))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def squared_differences(self, x: torch.Tensor, teacher: list | None = None) -> torch.Tensor:
        """S×N×C×h×w squared differences of each student to the teacher."""
        target = (teacher if teacher is not None else self.teacher(x, 4))[0]   # stride 4 only
        return torch.stack([(s(x) - target) ** 2 for s in self.students])

    def raw_map(self, x: torch.Tensor, teacher: list | None = None) -> torch.Tensor:
        d = self.squared_differences(x, teacher).mean(dim=(0, 2))[:, None]        # N×1×h×w
        return F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def map_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        teacher = self.teacher(x)                             # one teacher pass for both
        by_stride = dict(zip(self.teacher.strides, teacher))
        return (self.anomaly_map(x, teacher),
                [by_stride[s] for s in self.config.global_levels])

    def anomaly_map(self, x: torch.Tensor, teacher: list | None = None) -> torch.Tensor:
        raw = self.raw_map(x, teacher)
        if self.config.normalization == "per_image":
            lo = raw.amin(dim=(1, 2, 3), keepdim=True)
            hi = raw.amax(dim=(1, 2, 3), keepdim=True)
            return (raw - lo) / (hi - lo + 1e-12)
        lo, hi = self.map_range[0], self.map_range[1]
        return (raw - lo) / (hi - lo)


def fit_students(model: ResNetStudents, images: np.ndarray, ctx: FitContext, options: dict) -> list[dict]:
    """One stage: Adam on the students, the summed mean squared errors to the teacher."""
    weights = options["backbone_weights"] or PRETRAINED
    ctx.provenance["backbone"] = describe_weights(model.config.backbone, weights)
    model.teacher.load_state_dict(
        FeaturePyramid(model.config.backbone, model.teacher.strides, weights=weights).state_dict())
    device = torch.device(ctx.device)
    model.to(device)
    optimizer = torch.optim.Adam(model.students.parameters(), lr=ctx.lr)
    loop = TrainingLoop(ctx, model, "ResNetStudents", {"students": optimizer}, frozen=("teacher.",))

    def step(batch, _):
        x = augment_batch(model.normalize_input(batch.to(device)), options["augment"], loop.generator)
        return model.squared_differences(x).mean(dim=(1, 2, 3, 4)).sum()

    history = loop.run(nchw(images), [Stage("students", ctx.epochs, step, ("students",))])
    model.eval()
    return history


@torch.no_grad()
def fit_map_range(model: ResNetStudents, images, boxes, device) -> dict:
    """Min and max of the raw map over the validation good images' (valid) pixels."""
    model.eval().to(device)
    lo, hi = float("inf"), float("-inf")
    for start in range(0, len(images), 4):
        raw = model.raw_map(model.normalize_input(images[start:start + 4].to(device)))
        if boxes is not None:
            valid = model.valid_mask(boxes[start:start + 4].to(device))
            lo = min(lo, float(raw[valid].min()))
            hi = max(hi, float(raw[valid].max()))
        else:
            lo, hi = min(lo, float(raw.min())), max(hi, float(raw.max()))
    model.map_range.copy_(torch.tensor([lo, max(hi, lo + 1e-12)]))
    return {"map_min": lo, "map_max": hi, "rule": "min and max over validation good pixels"}
