"""STFPM-AE: STFPM whose student features pass through a light U-Net auto-encoder per level before
they are compared with the teacher's.

- teacher / student: as STFPM (``methods/stfpm``): the pretrained backbone frozen, the same
  architecture from random init, levels at strides 4, 8, 16;
- after each student level l a U-Net AE_l reconstructs the student's features, R_s = AE_l(F_s):
  three encoder blocks of two 3×3 conv + ReLU, each followed by a 2×2 max-pool; a bottleneck
  of two 3×3 conv + ReLU keeping the channels; a decoder of three 2×2 transposed convolutions
  (stride 2), each output concatenated with the matching encoder block's output, no convolution
  after a concatenation. Widths: with C the level's channels and w = max(8, C // 2), the encoder
  and bottleneck use w channels, the inner transposed convs output w, the last one C − w, so the
  final concatenation has exactly C channels;
- sizes: three poolings need sides divisible by 8. A level whose side is not (e.g. the stride-16
  level of a 64² input, 4×4) is zero-padded at the bottom/right to the next multiple of 8 and the
  output cropped back; at the default 256² input every level (64, 32, 16) is divisible and no
  padding is exported;
- training: (1) each AE_l is pretrained on the frozen *teacher's* level-l features, MSE, Adam
  1e-3 (option ``ae_pretrain_epochs``); (2) joint training of student and AEs with
  L = α·Σ_l ‖R_s − F_s‖² + Σ_l ½‖φ(R_s) − φ(F_t)‖², α = 1e-7, φ = channel-wise ℓ2 normalisation;
  the first term is the sum of squares per image (averaged over the batch), the second STFPM's
  form (summed over channels, averaged over positions), so STFPM's lr 0.4 applies. SGD momentum
  0.9, weight decay 1e-4, student lr 0.4, AE lr 0.04 (a tenth of the student's; option ``ae_lr``);
  gradients clipped to a total norm of 1.0 (option ``clip_norm``); the AEs stay frozen for the
  first 5 % of the epochs, at least one (the reference's 5 of 100; at the CPU default of 10 epochs: 1 epoch; option
  ``ae_frozen_epochs`` sets it explicitly). After training the student's BatchNorm statistics are
  recomputed over the training images, as for STFPM;
- map: per level ½‖φ(R_s) − φ(F_t)‖², bilinearly upsampled to the input, multiplied over levels.

CPU defaults: 10 joint epochs at batch 16 after 2 AE-pretraining epochs (about 1 min per joint
epoch for ~190 images at 256² on 2 busy cores, a few seconds per pretraining epoch); the reference
trains 100 epochs: ``--epochs 100`` gives it, with the AEs frozen for 5.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import FitContext, MethodConfigError
from ..common.backbones import recompute_batchnorm_statistics
from ..common.training import FrozenFeatures, Stage, TrainingLoop, batches_of, nchw
from ..stfpm.method import STFPM, level_distance, load_pretrained_teacher
from . import ALPHA, STFPMAEConfig

POOLINGS = 3


def _convs(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class FeatureUNet(nn.Module):
    """C-channel features → C-channel reconstruction (see the module docstring for the layout)."""

    def __init__(self, channels: int):
        super().__init__()
        w = max(8, channels // 2)
        if channels - w < 1:
            raise MethodConfigError(f"stfpm_ae: a level with {channels} channels is too narrow for "
                                    "the auto-encoder (needs at least 9)")
        self.encoder = nn.ModuleList([_convs(channels, w), _convs(w, w), _convs(w, w)])
        self.bottleneck = _convs(w, w)
        self.decoder = nn.ModuleList([nn.ConvTranspose2d(w, w, 2, stride=2),
                                      nn.ConvTranspose2d(2 * w, w, 2, stride=2),
                                      nn.ConvTranspose2d(2 * w, channels - w, 2, stride=2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        multiple = 2 ** POOLINGS
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up in self.decoder:
            x = torch.cat([up(x), skips.pop()], dim=1)
        if pad_h or pad_w:
            x = x[:, :, :h, :w]
        return x


class STFPMAE(STFPM):
    """STFPM's teacher and student (frozen-teacher training mode and the map's product included)
    with an auto-encoder after each student level; ``level_maps`` compares the reconstructions."""

    def __init__(self, config: STFPMAEConfig):
        super().__init__(config)
        self.autoencoders = nn.ModuleList(FeatureUNet(f.channels) for f in self.student.feature_info)

    def reconstructions(self, x: torch.Tensor):
        """(teacher features, student features, reconstructed student features) per level."""
        return self.reconstructions_from(self.map_teacher_levels(x), x)

    def reconstructions_from(self, teacher: dict[int, torch.Tensor], x: torch.Tensor):
        s = self.student(x)
        return ([teacher[stride] for stride in self.config.levels], s,
                [ae(f) for ae, f in zip(self.autoencoders, s)])

    def maps_from(self, teacher: dict[int, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        t, _, r = self.reconstructions_from(teacher, x)
        return [level_distance(ti, ri) for ti, ri in zip(t, r)]



def joint_loss(t, s, r, alpha: float = ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """(α·Σ_l ‖R_s − F_s‖² per image, Σ_l mean ½‖φ(R_s) − φ(F_t)‖²)."""
    n = s[0].shape[0]
    recon = sum(((ri - si) ** 2).sum() for ri, si in zip(r, s)) / n
    match = sum(level_distance(ti, ri).mean() for ti, ri in zip(t, r))
    return alpha * recon, match


def frozen_epochs(epochs: int, options: dict) -> int:
    """The reference freezes the AEs for 5 of 100 epochs: 5 % of the run, rounded, and at least
    one epoch when the run has two or more (so the student first adapts to the pretrained AEs)."""
    if options.get("ae_frozen_epochs") is not None:
        return int(options["ae_frozen_epochs"])
    return max(1, int(0.05 * epochs + 0.5)) if epochs >= 2 else 0


def fit_stfpm_ae(model: STFPMAE, images: np.ndarray, ctx: FitContext, options: dict) -> list[dict]:
    """Two stages: the auto-encoders pretrained on the teacher's features (Adam), then student
    and auto-encoders jointly (SGD), the auto-encoders frozen for its first epochs."""
    pre_epochs = options["ae_pretrain_epochs"]
    # default: the reference's 0.04 at the student's 0.4, scaled with the student's lr
    ae_lr = options["ae_lr"] if options["ae_lr"] is not None else ctx.lr * 0.04 / 0.4
    frozen = frozen_epochs(ctx.epochs, options)
    clip, alpha = options["clip_norm"], options["alpha"]
    device = torch.device(ctx.device)
    load_pretrained_teacher(model, ctx, options)
    model.to(device)
    data = nchw(images)
    adam = torch.optim.Adam(model.autoencoders.parameters(), lr=1e-3)
    sgd = torch.optim.SGD([
        {"params": list(model.student.parameters()), "lr": ctx.lr},
        {"params": list(model.autoencoders.parameters()), "lr": ae_lr}],
        momentum=options["momentum"], weight_decay=options["weight_decay"])
    loop = TrainingLoop(ctx, model, "STFPMAE", {"ae_pretrain": adam, "joint": sgd},
                        frozen=("teacher.",))
    trainable = list(model.student.parameters()) + list(model.autoencoders.parameters())

    # no augmentation here: the frozen teacher's features are computed once, not in every step
    teacher = FrozenFeatures(model.map_teacher_levels, data, model.normalize_input, device,
                             enabled=True)

    def pretrain(batch, index):                  # AE pretraining on teacher features
        t = teacher(model.normalize_input(batch.to(device)), index)
        return sum(F.mse_loss(ae(t[stride]), t[stride])
                   for ae, stride in zip(model.autoencoders, model.config.levels))

    def joint(batch, index):
        x = model.normalize_input(batch.to(device))
        recon, match = joint_loss(*model.reconstructions_from(teacher(x, index), x), alpha)
        return recon + match

    def freeze_and_clip(k):
        if k < frozen:
            for p in model.autoencoders.parameters():
                p.grad = None
        torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], clip)

    history = loop.run(data, [
        Stage("ae_pretrain", pre_epochs, pretrain, ("ae_pretrain",)),
        Stage("joint", ctx.epochs, joint, ("joint",), after_backward=freeze_and_clip,
              label=lambda k: "joint (AEs frozen)" if k < frozen else "joint")])
    layers = recompute_batchnorm_statistics(
        model.student, (model.normalize_input(b.to(device)) for b in batches_of(data, 16)), device)
    ctx.provenance["batchnorm_recomputed"] = {"layers": layers, "images": int(len(data))}
    ctx.provenance["autoencoders"] = {"pretrain_epochs": pre_epochs, "frozen_epochs": frozen,
                                      "lr": ae_lr, "alpha": alpha, "clip_norm": clip}
    model.eval()
    return history
