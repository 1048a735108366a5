"""STFPM: a pretrained CNN used as it is (teacher) and the same architecture trained from random
initialisation (student) to match the teacher's feature pyramid on good images.

- teacher: the pretrained backbone, frozen (EfficientNet-Lite0 offline: its stride-4/8/16 stage
  outputs; ResNet-18 from a local file: conv2_x, conv3_x, conv4_x = layer1..layer3);
- student: the same layers, random init;
- loss per level: ½‖F̂_t − F̂_s‖² of channel-wise ℓ2-normalised features, averaged over positions
  (and images), summed over levels;
- map: per level the same ½‖F̂_t − F̂_s‖², upsampled bilinearly and multiplied over levels (on
  the stride-4 grid, then upsampled to the input once: ``map_grid``), then smoothed by a Gaussian
  of σ = 2 px (``map_sigma``; ``common/scoring.py``: the PatchCore / PaDiM post-processing,
  measured on bottle and magnetic_tile in the docs);
- SGD lr 0.4, momentum 0.9, weight decay 1e-4 (the paper's), batch 16;
- after training the student's BatchNorm running statistics are recomputed over the training
  images (``recompute_batchnorm_statistics`` says why; a test checks it).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..base import FitContext
from ..common.backbones import PRETRAINED, FeaturePyramid, describe_weights, recompute_batchnorm_statistics
from ..common.scoring import AnomalyModel
from ..common.training import (FrozenFeatures, Stage, TrainingLoop, augment_batch, batches_of,
                               nchw)
from . import STFPMConfig  # noqa: F401  (the config lives with the declaration)


def level_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """½‖t/‖t‖ − s/‖s‖‖² over channels: N×C×h×w pair → N×1×h×w (the loss and map term)."""
    return 0.5 * ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum(1, keepdim=True)


def product_of_upsampled(level_maps: list[torch.Tensor], size, grid: str = "input") -> torch.Tensor:
    """STFPM's anomaly map: the per-level maps upsampled bilinearly and multiplied; on the input
    grid (``size``), or with ``grid="finest"`` on the finest level's grid and then upsampled to
    ``size`` once (two full-size resizes and products fewer)."""
    target = tuple(size) if grid == "input" else tuple(max((m.shape[-2:] for m in level_maps),
                                                           key=lambda hw: hw[0] * hw[1]))
    amap = None
    for level in level_maps:
        up = level if tuple(level.shape[-2:]) == target else \
            F.interpolate(level, size=target, mode="bilinear", align_corners=False)
        amap = up if amap is None else amap * up
    if target != tuple(size):
        amap = F.interpolate(amap, size=tuple(size), mode="bilinear", align_corners=False)
    return amap


def level_parts(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"s4": map, ...}: each level's map upsampled to the input (what evaluate reports per part);
    for any model with ``config.levels`` and ``level_maps(x)``."""
    size = x.shape[-2:]
    return {f"s{stride}": F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for stride, m in zip(model.config.levels, model.level_maps(x))}


class STFPM(AnomalyModel):
    def __init__(self, config: STFPMConfig):
        super().__init__()
        self.config = config
        # the teacher also computes the global branch's deeper levels when it is on
        self.teacher = FeaturePyramid(config.backbone, config.teacher_strides(config.levels))
        self.student = FeaturePyramid(config.backbone, tuple(config.levels))
        self.init_input(self.teacher.mean, self.teacher.std)
        self.init_global(self.teacher)
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()            # the teacher is used as it is: frozen BatchNorm too
        return self

    def teacher_levels(self, x: torch.Tensor, deepest: int | None = None) -> dict[int, torch.Tensor]:
        """{stride: teacher features} for every stride the teacher computes (up to ``deepest``)."""
        return dict(zip(self.teacher.strides, self.teacher(x, deepest)))

    def map_teacher_levels(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The teacher's features at the map's levels only (not the global branch's deeper
        ones): what the map and the student's loss compare with."""
        return self.teacher_levels(x, max(self.config.levels))

    def maps_from(self, teacher: dict[int, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        return [level_distance(teacher[stride], s)
                for stride, s in zip(self.config.levels, self.student(x))]

    def level_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.maps_from(self.map_teacher_levels(x), x)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        return product_of_upsampled(self.level_maps(x), x.shape[-2:], self.config.map_grid)

    def map_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        teacher = self.teacher_levels(x)                      # one teacher pass for both
        amap = product_of_upsampled(self.maps_from(teacher, x), x.shape[-2:], self.config.map_grid)
        return amap, [teacher[s] for s in self.config.global_levels]


def load_pretrained_teacher(model, ctx: FitContext, options: dict) -> None:
    """Teacher weights from the backbone's own offline weights or the user's file; recorded."""
    config = model.config
    weights = options["backbone_weights"] or PRETRAINED
    ctx.provenance["backbone"] = describe_weights(config.backbone, weights)
    pretrained = FeaturePyramid(config.backbone, model.teacher.strides, weights=weights)
    model.teacher.load_state_dict(pretrained.state_dict())


def fit_student(model: STFPM, images: np.ndarray, ctx: FitContext, options: dict) -> list[dict]:
    """The STFPM loop (also used by methods whose student is trained the same way): one stage,
    SGD on the student, the mean of the level maps as the loss."""
    device = torch.device(ctx.device)
    load_pretrained_teacher(model, ctx, options)
    model.to(device)
    data = nchw(images)
    optimizer = torch.optim.SGD(model.student.parameters(), lr=ctx.lr, momentum=options["momentum"],
                                weight_decay=options["weight_decay"])
    loop = TrainingLoop(ctx, model, type(model).__name__, {"student": optimizer}, frozen=("teacher.",))

    # without augmentation the frozen teacher's features are computed once, not in every step
    teacher = FrozenFeatures(model.map_teacher_levels, data, model.normalize_input, device,
                             enabled=options["augment"] == "none")

    def step(batch, index):
        x = augment_batch(model.normalize_input(batch.to(device)), options["augment"], loop.generator)
        return sum(m.mean() for m in model.maps_from(teacher(x, index), x))

    history = loop.run(data, [Stage("student", ctx.epochs, step, ("student",))])
    layers = recompute_batchnorm_statistics(
        model.student, (model.normalize_input(b.to(device)) for b in batches_of(data, 16)), device)
    ctx.provenance["batchnorm_recomputed"] = {"layers": layers, "images": int(len(data))}
    model.eval()
    return history
