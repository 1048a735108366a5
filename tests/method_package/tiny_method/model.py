"""The model (an AnomalyModel: uint8 images → map, score; normalisation, letterbox mask and the
image-score rule come with the base class) and its training (one stage of the shared loop:
checkpoints, resume and progress come with it)."""
from __future__ import annotations

import torch
import torch.nn as nn

from edgestad.methods.common.scoring import AnomalyModel
from edgestad.methods.common.training import Stage, TrainingLoop, nchw


class TinyDistill(AnomalyModel):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config.channels
        self.teacher = nn.Conv2d(3, c, 3, padding=1).requires_grad_(False)
        self.student = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))
        self.init_input((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images → the squared teacher-student difference, N×1×H×W."""
        return ((self.teacher(x) - self.student(x)) ** 2).mean(dim=1, keepdim=True)


def fit(model: TinyDistill, images, ctx, options: dict) -> list[dict]:
    device = torch.device(ctx.device)
    model.to(device)
    optimizer = torch.optim.SGD(model.student.parameters(), lr=ctx.lr, momentum=options["momentum"])
    loop = TrainingLoop(ctx, model, "TinyDistill", {"student": optimizer})

    def step(batch, _):
        return model.anomaly_map(model.normalize_input(batch.to(device))).mean()

    history = loop.run(nchw(images), [Stage("student", ctx.epochs, step, ("student",))])
    model.eval()
    return history
