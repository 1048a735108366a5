"""STFPM: a pretrained CNN used as it is (teacher) and the same architecture trained from random
initialisation (student) to match the teacher's feature pyramid on good images.

- teacher: the pretrained backbone, frozen (EfficientNet-Lite0 offline: its stride-4/8/16 stage
  outputs; ResNet-18 from a local file: conv2_x, conv3_x, conv4_x = layer1..layer3);
- student: the same layers, random init;
- loss per level: ½‖F̂_t − F̂_s‖² of channel-wise ℓ2-normalised features, averaged over positions
  (and images), summed over levels;
- map: per level the same ½‖F̂_t − F̂_s‖², upsampled bilinearly to the input, multiplied over
  levels, then smoothed by a Gaussian of σ = 2 px (``map_sigma``; ``common/scoring.py``: the
  PatchCore / PaDiM post-processing, measured on bottle and magnetic_tile in the README);
- SGD lr 0.4, momentum 0.9, weight decay 1e-4 (the paper's), batch 16;
- after training the student's BatchNorm running statistics are recomputed over the training
  images (``recompute_batchnorm_statistics`` says why; a test checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..base import ConfigMixin, FitContext, Method, batches_of, nchw, train_epochs
from ..common.backbones import (BACKBONES, PRETRAINED, FeaturePyramid, check_backbone, describe_weights,
                                recompute_batchnorm_statistics)
from ..common.global_score import GlobalBranchSettings
from ..common.scoring import MAP_SIGMA, AnomalyModel, check_map_sigma, parse_image_score
from .. import register


@dataclass
class STFPMConfig(GlobalBranchSettings):
    backbone: str = "efficientnet-lite0"
    levels: tuple[int, ...] = (4, 8, 16)          # network strides of the matched stages
    input_size: tuple[int, int] = (256, 256)       # (height, width)
    image_score: str = "topk:0.01"                 # see methods/common/scoring.py
    resize: str = "area_or_linear"                 # or "letterbox"
    map_sigma: float = MAP_SIGMA                   # Gaussian smoothing of the map, px (0 = off)

    # bundles from before map smoothing / the global branch
    STORED_DEFAULTS: ClassVar[dict] = {**GlobalBranchSettings.STORED_DEFAULTS, "map_sigma": 0.0}

    def __post_init__(self):
        parse_image_score(self.image_score)
        check_backbone(self.backbone, tuple(self.levels))
        check_map_sigma(self.map_sigma, self.input_size)
        self.check_global(BACKBONES[self.backbone][0])


def level_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """½‖t/‖t‖ − s/‖s‖‖² over channels: N×C×h×w pair → N×1×h×w (the loss and map term)."""
    return 0.5 * ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum(1, keepdim=True)


def product_of_upsampled(level_maps: list[torch.Tensor], size) -> torch.Tensor:
    """STFPM's anomaly map: the per-level maps upsampled bilinearly to ``size``, multiplied."""
    amap = None
    for level in level_maps:
        up = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        amap = up if amap is None else amap * up
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

    def teacher_levels(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """{stride: teacher features} for every stride the teacher computes."""
        return dict(zip(self.teacher.strides, self.teacher(x)))

    def maps_from(self, teacher: dict[int, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        return [level_distance(teacher[stride], s)
                for stride, s in zip(self.config.levels, self.student(x))]

    def level_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.maps_from(self.teacher_levels(x), x)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        return product_of_upsampled(self.level_maps(x), x.shape[-2:])

    def map_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        teacher = self.teacher_levels(x)                      # one teacher pass for both
        amap = product_of_upsampled(self.maps_from(teacher, x), x.shape[-2:])
        return amap, [teacher[s] for s in self.config.global_levels]


@register
class STFPMMethod(Method):
    name = "stfpm"
    title = "STFPM: pretrained CNN teacher, same-architecture student, feature-pyramid matching"
    paper = "Wang et al., BMVC 2021"
    default_backbone = "efficientnet-lite0"
    config_cls = STFPMConfig
    defaults = {"epochs": 30, "batch_size": 16, "lr": 0.4}
    option_names = ("backbone_weights", "momentum", "weight_decay", "augment")

    def build(self, config: STFPMConfig) -> STFPM:
        return STFPM(config)

    def parts(self, model: STFPM, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return level_parts(model, x)

    def fit(self, model: STFPM, images: np.ndarray, ctx: FitContext) -> list[dict]:
        return fit_student(model, images, ctx)


def load_pretrained_teacher(model, ctx: FitContext) -> None:
    """Teacher weights from the backbone's own offline weights or the user's file; recorded."""
    config = model.config
    weights = ctx.options.get("backbone_weights") or PRETRAINED
    ctx.provenance["backbone"] = describe_weights(config.backbone, weights)
    pretrained = FeaturePyramid(config.backbone, model.teacher.strides, weights=weights)
    model.teacher.load_state_dict(pretrained.state_dict())


def fit_student(model: STFPM, images: np.ndarray, ctx: FitContext) -> list[dict]:
    """The STFPM loop (also used by methods whose student is trained the same way)."""
    device = torch.device(ctx.device)
    load_pretrained_teacher(model, ctx)
    model.to(device)
    data = nchw(images)
    optimizer = torch.optim.SGD(model.student.parameters(), lr=ctx.lr,
                                momentum=float(ctx.options.get("momentum", 0.9)),
                                weight_decay=float(ctx.options.get("weight_decay", 1e-4)))
    history = train_epochs(model, data, ctx, {"student": optimizer},
                           lambda x: sum(m.mean() for m in model.level_maps(x)), "student",
                           augment=ctx.options.get("augment", "none"))
    layers = recompute_batchnorm_statistics(
        model.student, (model.normalize_input(b.to(device)) for b in batches_of(data, 16)), device)
    ctx.provenance["batchnorm_recomputed"] = {"layers": layers, "images": int(len(data))}
    model.eval()
    return history
