"""STFPM with per-level U-Net auto-encoders after the student: the declaration (config, options,
defaults). The model and its training are in method.py, imported when a model is built."""
from __future__ import annotations

from dataclasses import dataclass

from .. import register
from ..base import Method, Option
from ..common.settings import BACKBONE_WEIGHTS, MOMENTUM, WEIGHT_DECAY, PretrainedFeatureConfig

ALPHA = 1e-7       # weight of the reconstruction term (the reference's)


@dataclass
class STFPMAEConfig(PretrainedFeatureConfig):
    levels: tuple[int, ...] = (4, 8, 16)


@register
class STFPMAEMethod(Method):
    name = "stfpm_ae"
    title = "STFPM with a U-Net auto-encoder after each student level (reconstructed student features)"
    paper = "STFPM (Wang et al., BMVC 2021) with per-level feature auto-encoders"
    default_backbone = "efficientnet-lite0"
    config_cls = STFPMAEConfig
    defaults = {"epochs": 10, "batch_size": 16, "lr": 0.4}
    options = (BACKBONE_WEIGHTS, MOMENTUM, WEIGHT_DECAY,
               Option("ae_lr", float, None, "SGD lr of the auto-encoders in the joint stage; "
                      "default: a tenth of the student's", minimum=0),
               Option("ae_pretrain_epochs", int, 2, "epochs of auto-encoder pretraining on the "
                      "teacher's features (Adam 1e-3)", minimum=0),
               Option("ae_frozen_epochs", int, None, "joint epochs with the auto-encoders frozen; "
                      "default: 5 % of the epochs, at least one", minimum=0),
               Option("clip_norm", float, 1.0, "gradient clipping: total norm", minimum=0),
               Option("alpha", float, ALPHA, "weight of the reconstruction term", minimum=0))

    model_class, train_function = ".method:STFPMAE", ".method:fit_stfpm_ae"
    parts_function = "..stfpm.method:level_parts"

    def tiny(self, workdir):
        return {"settings": {"input_size": (64, 64)}, "options": {"ae_pretrain_epochs": 1},
                "lr": None}
