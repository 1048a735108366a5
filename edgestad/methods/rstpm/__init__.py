"""RSTPM (Yamada, Kamiya, Hotta: "Reconstructed Student-Teacher and Discriminative Networks for
Anomaly Detection", 2022): the declaration (config, options, defaults). The model and its
training are in method.py, imported when a model is built."""
from __future__ import annotations

from dataclasses import dataclass

from .. import register
from ..base import Method, MethodConfigError, Option
from ..common.settings import (BACKBONE_WEIGHTS, MOMENTUM, WEIGHT_DECAY, PretrainedFeatureConfig,
                               check_choice)

LEVELS = (4, 8, 16)
TEACHER2_CHOICES = ("efficientnet-lite0", "resnet18", "resnet50")


@dataclass
class RSTPMConfig(PretrainedFeatureConfig):
    backbone: str = "efficientnet-lite0"           # teacher 1 / student 1
    teacher2: str = "efficientnet-lite0"           # stage-start taps offline; resnet50: the paper's
    recon_channels: tuple[int, ...] = (128, 64, 32)  # student 2's widths at strides 16, 8, 4
    disc_channels: tuple[int, ...] = (16, 32, 64)  # discriminator U-Net widths (3 poolings)

    def map_levels(self) -> tuple[int, ...]:
        return LEVELS

    def teacher_levels(self) -> tuple[int, ...]:
        return LEVELS + (32,)                      # teacher 1's strides

    def check(self) -> None:
        check_choice("teacher2", self.teacher2, TEACHER2_CHOICES)
        if len(self.recon_channels) != 3 or len(self.disc_channels) != 3:
            raise MethodConfigError("recon_channels and disc_channels: three widths each")


@register
class RSTPMMethod(Method):
    name = "rstpm"
    title = ("RSTPM: STPM pair + feature-reconstruction pair with attention and a different teacher, "
             "discriminative U-Net on pseudo-anomalies")
    paper = "Yamada, Kamiya, Hotta, 2022 (arXiv:2210.07548)"
    default_backbone = "efficientnet-lite0 (teacher 2: its stage-start blocks; resnet50 with a file)"
    config_cls = RSTPMConfig
    defaults = {"epochs": 3, "batch_size": 16, "lr": 0.4}
    options = (BACKBONE_WEIGHTS,
               Option("teacher2_weights", "file", None, "local weights file of teacher 2 (needed "
                      "for teacher2=resnet18 / resnet50)"),
               MOMENTUM, WEIGHT_DECAY,
               Option("disc_epochs", int, 3, "epochs of the discriminator stage (the paper: 300)",
                      minimum=0),
               Option("disc_lr", float, 1e-4, "Adam lr of the discriminator", minimum=0),
               Option("anomaly_source", "folder", None, "images blended into the pseudo-anomalies; "
                      "default: the shared natural-image folder, else the good image itself"),
               Option("p_anomaly", float, 0.5, "share of training images made pseudo-anomalous",
                      minimum=0))

    model_class, train_function, parts_function = ".method:RSTPM", ".method:fit_rstpm", ".method:rstpm_parts"

    def fp32_modules(self, config) -> tuple[str, ...]:
        return super().fp32_modules(config) + ("maps", "discriminator.inc")

    def tiny(self, workdir):
        return {"settings": {"input_size": (64, 64), "recon_channels": (16, 16, 16),
                             "disc_channels": (8, 8, 8)},
                "options": {"disc_epochs": 1}, "lr": None}
