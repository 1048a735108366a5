"""The ResNet-18-teacher / CNN-students study: the declaration (config, options, defaults). The
model and its training are in method.py, imported when a model is built."""
from __future__ import annotations

from dataclasses import dataclass

from .. import register
from ..base import Method
from ..common.settings import BACKBONE_WEIGHTS, PretrainedFeatureConfig, augment_option


@dataclass
class ResNetStudentsConfig(PretrainedFeatureConfig):
    backbone: str = "efficientnet-lite0"            # resnet18 with a local weights file: the study's
    num_students: int = 3
    student_channels: tuple[int, ...] = (32, 64, 128)
    normalization: str = "validation"               # or "per_image" (the study's; no image score)
    input_size: tuple[int, int] = (256, 256)        # the study: 512 x 512

    def check(self) -> None:
        if self.normalization not in ("validation", "per_image"):
            raise ValueError(f"normalization must be 'validation' or 'per_image', got {self.normalization!r}")
        if self.num_students < 1:
            raise ValueError(f"--students: must be at least 1, got {self.num_students}")


@register
class ResNetStudentsMethod(Method):
    name = "resnet_students"
    title = "ResNet-18 teacher (first stage) and three small CNN students, squared-error map"
    paper = "the ResNet-18 teacher / CNN-students study (reference documents)"
    default_backbone = "efficientnet-lite0 (stride-4 stage); resnet18 with a local weights file"
    config_cls = ResNetStudentsConfig
    defaults = {"epochs": 8, "batch_size": 8, "lr": 1e-3}
    options = (BACKBONE_WEIGHTS, augment_option("flip"))
    model_class, train_function = ".method:ResNetStudents", ".method:fit_students"
    statistics_function = ".method:fit_map_range"     # the map's range on validation good pixels

    def tiny(self, workdir):
        return {"settings": {"input_size": (64, 64), "student_channels": (8, 8, 8)}, "options": {},
                "lr": None}
