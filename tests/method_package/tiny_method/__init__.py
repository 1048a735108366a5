"""tiny_distill: the smallest student-teacher method, as a package of its own.

The declaration (config, defaults, typed options) is torch-free, so `edgestad methods` and
`train --help` list the method without importing its model; ``model_class`` and
``train_function`` name what the verbs import from model.py when they run. `edgestad` finds this
module through the entry point in pyproject.toml.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgestad.methods import register
from edgestad.methods.base import ConfigMixin, Method, Option
from edgestad.methods.common.settings import parse_image_score


@dataclass
class TinyDistillConfig(ConfigMixin):
    channels: int = 8                        # feature channels of teacher and student
    input_size: tuple[int, int] = (64, 64)   # (height, width); every config has it
    image_score: str = "max"                 # and the image-score rule
    resize: str = "area_or_linear"           # and the resize rule ("letterbox")

    def __post_init__(self):
        parse_image_score(self.image_score)
        if self.channels < 1:
            raise ValueError(f"channels: must be at least 1, got {self.channels}")


@register
class TinyDistillMethod(Method):
    name = "tiny_distill"
    title = "Tiny distillation: a frozen random 3x3 convolution as teacher, a two-layer student"
    paper = "an example method (tests/method_package)"
    default_backbone = "a random 3x3 convolution"
    config_cls = TinyDistillConfig
    defaults = {"epochs": 2, "batch_size": 4, "lr": 0.05}
    options = (Option("momentum", float, 0.9, "SGD momentum", minimum=0),)
    model_class, train_function = ".model:TinyDistill", ".model:fit"
