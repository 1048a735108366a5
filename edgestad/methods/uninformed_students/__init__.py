"""Uninformed Students (Bergmann, Fauser, Sattlegger, Steger, CVPR 2020): the declaration
(config, options, presets, defaults), torch-free; the model is imported when it is built.

Folder contents: ``patchnet.py`` (patch networks T̂ and their exact fast dense form), ``model.py``
(teacher + M students per scale, eq. 8-12, and the score statistics), ``fused.py`` (teacher and
students of a scale as one grouped network: a deploy form), ``teacher.py`` (teacher pretraining,
§3.1), ``teachers.py`` + ``shipped_teachers/`` (teacher files), ``students.py`` (student
training, §3.2: one stage per scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .. import register
from ..base import POST_TRAINING_SETTINGS, ConfigMixin, Method, MethodConfigError, Option
from ..common.settings import IMAGENET_MEAN, IMAGENET_STD, parse_image_score

__all__ = ["UninformedStudentsConfig", "UninformedStudentsMethod"]


@dataclass
class UninformedStudentsConfig(ConfigMixin):
    """Hyper-parameters, named as in the paper (p, M, d) plus the cost levers."""
    patch_sizes: tuple[int, ...] = (17, 33, 65)   # receptive fields p of the scales
    num_students: int = 3                          # M
    descriptor_dim: int = 128                      # d
    width: int = 128                               # channels of the conv layers (paper: 128)
    leaky_slope: float = 5e-3
    dense_stride: int = 1                          # 1 = exact dense map; 2, 4, ... = sampled
    padding_mode: str = "reflect"                  # image border handling of the dense map
    input_size: tuple[int, int] = (256, 256)       # (height, width)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_score: str = "max"                       # see methods/common/scoring.py
    resize: str = "area_or_linear"                 # or "letterbox"

    # the students train on the strided T̂: the dense stride only changes inference
    NOT_TRAINED: ClassVar[tuple[str, ...]] = POST_TRAINING_SETTINGS + ("dense_stride",)

    def __post_init__(self):
        parse_image_score(self.image_score)


@register
class UninformedStudentsMethod(Method):
    name = "uninformed_students"
    title = ("Uninformed Students: patch-descriptor teacher distilled from a CNN, M students, "
             "regression error + predictive variance at p = 17/33/65")
    paper = "Bergmann et al., CVPR 2020"
    default_backbone = "patch networks distilled from EfficientNet-Lite0 (shipped teachers)"
    config_cls = UninformedStudentsConfig
    defaults = {"epochs": 100, "batch_size": 1, "lr": 1e-4}
    options = (Option("teachers", "files", (), "teacher files from pretrain-teacher, one per scale "
                      "(default: the shipped ones)", flag="--teacher"),
               Option("crop_size", int, None, "train on random crops of this side (default: the "
                      "whole image)", minimum=1, flag="--crop-size"),
               Option("weight_decay", float, 1e-5, "Adam weight decay"))
    # the two documented starting points (width and d come from the teachers); "edge" is chosen
    # from the accuracy–cost frontier (README "Performance")
    presets = {"paper": {"patch_sizes": (17, 33, 65), "dense_stride": 1},
               "edge": {"patch_sizes": (65,), "dense_stride": 4}}
    model_class, train_function = ".model:UninformedStudents", ".students:fit_uninformed_students"
    statistics_function, parts_function = ".model:fit_score_stats", ".model:scale_parts"

    def backbone_of(self, config) -> str:
        return "patch networks p=" + "/".join(str(p) for p in config.patch_sizes)

    def check_options(self, options: dict, config) -> None:
        crop, side = options["crop_size"], min(config.input_size)
        if crop is not None and crop > side:
            raise MethodConfigError(f"--crop-size: {crop} is larger than the input size {side}")

    def prepare(self, config: UninformedStudentsConfig, options: dict) -> UninformedStudentsConfig:
        """The teachers fix the descriptor size d and the width; the students copy them."""
        from .teachers import read_teacher_file, resolve_teachers
        shapes = {}
        for p, path in resolve_teachers(config.patch_sizes, options.get("teachers", ())).items():
            _, meta = read_teacher_file(path)
            shapes[p] = (meta["config"]["descriptor_dim"], meta["config"]["width"])
        if len(set(shapes.values())) > 1:
            raise ValueError(f"--teacher: teachers disagree on (descriptor_dim, width): {shapes}; "
                             "all scales must agree")
        d, width = next(iter(shapes.values()))
        return config.replace(descriptor_dim=d, width=width)

    def fit(self, model, images, ctx) -> list[dict]:
        history = super().fit(model, images, ctx)
        ctx.provenance["backbone"] = {"name": self.backbone_of(model.config),
                                      "teachers": ctx.provenance["teachers"]}
        return history

    def deploy_forms(self) -> dict:
        from .fused import fuse_model
        return {"fused": fuse_model}

    def tiny(self, workdir) -> dict:
        from .teachers import write_random_teacher
        teacher = write_random_teacher(Path(workdir) / "teacher_p17.safetensors", patch_size=17,
                                       descriptor_dim=8, width=4)
        return {"settings": {"patch_sizes": (17,), "num_students": 2, "input_size": (64, 64)},
                "options": {"teachers": (str(teacher),), "crop_size": 32}, "lr": 1e-3}
