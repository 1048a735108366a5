"""Student training (Uninformed Students §3.2, eq. 7).

M students with the teacher's architecture, randomly initialised, regress the teacher's descriptors
of anomaly-free images, normalised per channel by their mean and standard deviation over the
training set.

Why random crops and offsets instead of the dense map: each descriptor depends only on its own p×p
patch, so the loss over the dense map is a mean over independent per-pixel terms. The strided
network T̂ applied to a crop starting at pixel (y0, x0) gives exactly the dense descriptors at
(y0 + 2^k·i, x0 + 2^k·j). Drawing crop positions uniformly therefore samples the dense loss without
bias, at 4^k times less computation per step (k = number of poolings).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..base import FitContext
from ..common.training import Stage, TrainingLoop, nchw
from .model import UninformedStudents


def _padded(model: UninformedStudents, images_uint8: torch.Tensor, p: int) -> torch.Tensor:
    """Normalised images padded like PatchNet.dense pads them (p//2 before, p after)."""
    x = model.normalize_input(images_uint8)
    return F.pad(x, (p // 2, p, p // 2, p), mode=model.config.padding_mode)


@torch.no_grad()
def fit_descriptor_stats(model: UninformedStudents, images: torch.Tensor, device,
                         batch_size: int = 8) -> None:
    """Per-channel mean and std of each teacher's descriptors over the training images."""
    for p in model.config.patch_sizes:
        teacher = model.teachers[str(p)]
        total = total_sq = None
        count = 0
        for start in range(0, len(images), batch_size):
            x = model.normalize_input(images[start:start + batch_size].to(device))
            desc = teacher.dense(x, 2 ** teacher.num_poolings, model.config.padding_mode)
            desc = desc.double()
            s, sq = desc.sum(dim=(0, 2, 3)), (desc ** 2).sum(dim=(0, 2, 3))
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
            count += desc.shape[0] * desc.shape[2] * desc.shape[3]
        mean = total / count
        std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
        mean_buf, std_buf = model.descriptor_stats(p)
        mean_buf.copy_(mean.view_as(mean_buf).float())
        std_buf.copy_(std.view_as(std_buf).float())


def fit_uninformed_students(model: UninformedStudents, images: np.ndarray, ctx: FitContext,
                            options: dict) -> list[dict]:
    """Load every scale's teacher (recorded in the provenance), then train the students."""
    from edgestad.files import sha256_file
    from .teachers import read_teacher_file, resolve_teachers
    info = {}
    for p, path in resolve_teachers(model.config.patch_sizes, options["teachers"]).items():
        state, meta = read_teacher_file(path)
        model.teachers[str(p)].load_state_dict(state)
        model.teachers[str(p)].requires_grad_(False)
        info[str(p)] = {"file": path.name, "sha256": sha256_file(path),
                        "iterations": meta["iterations"],
                        "pretrained_cnn": meta["pretrained_cnn"]["name"]}
    ctx.provenance["teachers"] = info
    return train_students(model, images, ctx, weight_decay=options["weight_decay"],
                          crop_size=options["crop_size"])


def train_students(model: UninformedStudents, images: np.ndarray, ctx: FitContext, *,
                   weight_decay: float = 1e-5, crop_size: int | None = None) -> list[dict]:
    """Train every scale's students, one stage per scale (``ctx.epochs`` each), resumable per
    epoch from ``ctx.checkpoint``.

    images: N×H×W×3 uint8 training images (already resized). crop_size: side of the image region
    each step sees (None = whole image)."""
    device = torch.device(ctx.device)
    model.to(device)
    data = nchw(images)
    optimizers = {str(p): torch.optim.Adam(model.students[str(p)].parameters(), lr=ctx.lr,
                                           weight_decay=weight_decay)
                  for p in model.config.patch_sizes}
    loop = TrainingLoop(ctx, model, "students", optimizers, upgrade=per_scale_checkpoint)

    def scale(p: int) -> Stage:
        students, teacher = model.students[str(p)], model.teachers[str(p)]
        mean, std = model.descriptor_stats(p)
        stride = 2 ** teacher.num_poolings

        def train_mode(_):
            teacher.eval()
            students.train()

        def step(batch, _):
            region = _random_region(_padded(model, batch.to(device), p), p, stride, crop_size,
                                    loop.generator)
            with torch.no_grad():
                target = (teacher(region) - mean) / std
            loss = sum(((s(region) - target) ** 2).sum(1).mean() for s in students)
            return loss, float(loss.detach()) / len(students)

        return Stage(str(p), ctx.epochs, step, (str(p),), start_epoch=train_mode,
                     finish=students.eval, label=lambda _: f"students p={p}",
                     extra={"patch_size": p}, desc=f"students p={p}")

    return loop.run(data, [scale(p) for p in model.config.patch_sizes],
                    fresh_start=lambda: fit_descriptor_stats(model, data, device))


def per_scale_checkpoint(state: dict) -> dict:
    """A checkpoint of the earlier per-scale loop (one optimizer, ``optimizer_scale``) in the
    shared loop's form; the per-scale ``done`` keeps its meaning (stages are named by p)."""
    if "optimizer" in state:
        state = {**state, "optimizers": {state["optimizer_scale"]: state["optimizer"]}}
    return state


def _random_region(padded: torch.Tensor, p: int, stride: int, crop_size: int | None,
                   generator: torch.Generator) -> torch.Tensor:
    """A region of the padded image whose top-left is uniform over dense positions.

    The padded image has p//2 pixels before the image and p after; a region starting at padded
    pixel y0 holds the patches centred on image rows y0, y0 + stride, ... The full region
    (crop_size None) starts at a random offset below the network stride, so every dense position
    is reachable, and ends where the last image pixel's patch ends.
    """
    height = padded.shape[-2] - p - p // 2   # the image's own height and width
    width = padded.shape[-1] - p - p // 2
    if crop_size is None or crop_size >= min(height, width):
        oy, ox = (int(v) for v in torch.randint(0, stride, (2,), generator=generator))
        return padded[..., oy:height + p - 1, ox:width + p - 1]
    span = crop_size + p - 1
    y0 = int(torch.randint(0, height - crop_size + 1, (1,), generator=generator))
    x0 = int(torch.randint(0, width - crop_size + 1, (1,), generator=generator))
    return padded[..., y0:y0 + span, x0:x0 + span]
