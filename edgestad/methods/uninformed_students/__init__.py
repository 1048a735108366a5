"""Uninformed Students (Bergmann, Fauser, Sattlegger, Steger, CVPR 2020) on the Method interface.

Folder contents: ``patchnet.py`` (patch networks T̂ and their exact fast dense form), ``model.py``
(config, teacher + M students per scale, eq. 8-12), ``fused.py`` (teacher and students of a scale
as one grouped network: a deploy form), ``teacher.py`` (teacher pretraining, §3.1),
``teachers.py`` + ``shipped_teachers/`` (teacher files), ``students.py`` (student training, §3.2).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import register
from ..base import FitContext, Method
from .model import UninformedStudents, UninformedStudentsConfig

__all__ = ["UninformedStudents", "UninformedStudentsConfig", "UninformedStudentsMethod"]


@torch.no_grad()
def fit_score_stats(model: UninformedStudents, images: torch.Tensor, device,
                    batch_size: int = 4) -> dict:
    """Mean and std of e and v over all (sampled) pixels of the validation good images (eq. 11)."""
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


@register
class UninformedStudentsMethod(Method):
    name = "uninformed_students"
    title = ("Uninformed Students: patch-descriptor teacher distilled from a CNN, M students, "
             "regression error + predictive variance at p = 17/33/65")
    paper = "Bergmann et al., CVPR 2020"
    default_backbone = "patch networks distilled from EfficientNet-Lite0 (shipped teachers)"
    config_cls = UninformedStudentsConfig
    defaults = {"epochs": 100, "batch_size": 1, "lr": 1e-4}
    option_names = ("teachers", "crop_size", "weight_decay")

    def backbone_of(self, config) -> str:
        return "patch networks p=" + "/".join(str(p) for p in config.patch_sizes)

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

    def build(self, config: UninformedStudentsConfig) -> UninformedStudents:
        return UninformedStudents(config)

    def fit(self, model: UninformedStudents, images: np.ndarray, ctx: FitContext) -> list[dict]:
        from edgestad.files import sha256_file
        from .students import train_students
        from .teachers import read_teacher_file, resolve_teachers
        info = {}
        for p, path in resolve_teachers(model.config.patch_sizes, ctx.options.get("teachers", ())).items():
            state, meta = read_teacher_file(path)
            model.teachers[str(p)].load_state_dict(state)
            model.teachers[str(p)].requires_grad_(False)
            info[str(p)] = {"file": path.name, "sha256": sha256_file(path),
                            "iterations": meta["iterations"],
                            "pretrained_cnn": meta["pretrained_cnn"]["name"]}
        ctx.provenance["teachers"] = info
        ctx.provenance["backbone"] = {"name": self.backbone_of(model.config),
                                      "teachers": info}
        return train_students(model, images, ctx.checkpoint, epochs=ctx.epochs,
                              batch_size=ctx.batch_size, lr=ctx.lr,
                              weight_decay=float(ctx.options.get("weight_decay", 1e-5)),
                              crop_size=ctx.options.get("crop_size"), device=ctx.device,
                              seed=ctx.seed, progress=ctx.progress, log=ctx.log)

    def calibrate(self, model, images, boxes, device) -> dict:
        return fit_score_stats(model, images, device)

    def parts(self, model: UninformedStudents, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        return {f"p{p}": model.upsample(model.scale_score(x, p), h, w)
                for p in model.config.patch_sizes}

    def deploy_forms(self) -> dict:
        from .fused import fuse_model
        return {"fused": fuse_model}
