"""STFPM / STPM (Wang, Wu, Cui, Sun, Xu: "Student-Teacher Feature Pyramid Matching for Anomaly
Detection", BMVC 2021): the declaration (config, options, defaults). The model and its training
are in method.py, imported when a model is built."""
from __future__ import annotations

from dataclasses import dataclass

from .. import register
from ..base import Method
from ..common.settings import (BACKBONE_WEIGHTS, MOMENTUM, WEIGHT_DECAY, PretrainedFeatureConfig,
                               augment_option)


@dataclass
class STFPMConfig(PretrainedFeatureConfig):
    levels: tuple[int, ...] = (4, 8, 16)          # network strides of the matched stages
    image_score: str = "topk:0.01"                 # see methods/common/scoring.py
    score_margin: int = 4                          # px of the frame's edge the image score ignores


@register
class STFPMMethod(Method):
    name = "stfpm"
    title = "STFPM: pretrained CNN teacher, same-architecture student, feature-pyramid matching"
    paper = "Wang et al., BMVC 2021"
    default_backbone = "efficientnet-lite0"
    config_cls = STFPMConfig
    # 60 epochs: 30 -> 60 raised AU-PRO 0.880 -> 0.915 on screw (15: 0.842); a folder of more
    # than 256 training images reaches the 960 steps of 60 epochs of 256 sooner, never in fewer
    # than the 30 epochs of the earlier default (docs/results/real-data.md, "Training longer")
    defaults = {"epochs": 60, "batch_size": 16, "lr": 0.4}
    default_steps, min_epochs = 960, 30
    options = (BACKBONE_WEIGHTS, MOMENTUM, WEIGHT_DECAY, augment_option("none"))
    model_class, train_function, parts_function = ".method:STFPM", ".method:fit_student", ".method:level_parts"

    def tiny(self, workdir):
        return {"settings": {"input_size": (64, 64)}, "options": {}, "lr": 0.1}
