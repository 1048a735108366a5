"""Teacher pretraining (Uninformed Students §3.1, eq. 1-6).

A patch network T̂ learns descriptors of natural-image patches from three losses:
- knowledge distillation L_k: a decoder D maps T̂(p) to the pooled features of a pretrained CNN P;
- metric learning L_m: a triplet loss with in-triplet hard negative and anchor swap;
- decorrelation L_c: the squared off-diagonal correlations of the descriptors in a batch.
The paper's choice for MVTec AD is λ_k = 1, λ_m = 0, λ_c = 1 (our defaults).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common.checkpoint import load_checkpoint, save_checkpoint
from ..common.settings import IMAGENET_MEAN, IMAGENET_STD
from .patchnet import PatchNet
from .teachers import write_teacher_file


@dataclass
class TeacherConfig:
    patch_size: int = 65
    descriptor_dim: int = 128
    width: int = 128
    leaky_slope: float = 5e-3
    iterations: int = 50_000            # the paper's 5×10⁴
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 1e-5
    lambda_k: float = 1.0
    lambda_m: float = 0.0
    lambda_c: float = 1.0
    triplet_margin: float = 1.0
    pretrained_cnn: str = "efficientnet-lite0"   # or "resnet18" (needs a local weights file)
    cnn_weights: str | None = None
    cnn_input_size: int = 224           # patches are resized to this before P sees them
    grayscale_prob: float = 0.1
    noise_std: float = 0.1
    holdout_fraction: float = 0.1
    seed: int = 0


# --- the pretrained network P ----------------------------------------------------------------
class PretrainedFeatures(nn.Module):
    """P: ImageNet-pretrained CNN → globally pooled feature vector, frozen."""

    def __init__(self, name: str = "efficientnet-lite0", weights: str | None = None):
        super().__init__()
        self.name = name
        if name == "efficientnet-lite0":
            from efficientnet_lite_pytorch import EfficientNet
            if weights is None:
                from ..common.backbones import efficientnet_weights_file
                weights = str(efficientnet_weights_file(name))
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
            self.features = net.extract_features
            self.net = net
            # EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TF's mean 127, std 128).
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
            self.dim = 1280
        elif name == "resnet18":
            self.net = _resnet18_from_file(weights)
            self.features = self._resnet_features
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            self.dim = 512                  # the paper's P: ResNet-18's 512-d pooled features
        else:
            raise ValueError(f"--pretrained-cnn must be efficientnet-lite0 or resnet18, got {name!r}")
        self.weights = str(weights)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def _resnet_features(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    @torch.no_grad()
    def forward(self, patches01: torch.Tensor, size: int) -> torch.Tensor:
        x = F.interpolate(patches01, size=(size, size), mode="bilinear", align_corners=False)
        return self.features((x - self.mean) / self.std).mean(dim=(2, 3))


def _resnet18_from_file(weights: str | None):
    if not weights:
        raise ValueError("--pretrained-cnn resnet18 needs --cnn-weights PATH to a local torchvision "
                         "resnet18 state dict (e.g. resnet18-f37072fd.pth from the torch hub cache)")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--cnn-weights: no such file: {path}")
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("resnet18 as P needs torchvision: pip install 'torch==2.14.1' "
                           "'torchvision==0.29.1'") from exc
    net = torchvision.models.resnet18()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net


# --- the paper's patch augmentation ----------------------------------------------------------
class PatchSampler:
    """Draws (anchor, positive, negative) patch triplets from a pool of natural images (§3.1).

    Each image is zoomed so its shorter side is a random integer in [4p, 16p] and a p×p crop is
    taken. The positive is the same zoomed image translated by up to ±(p−1)/4 pixels with Gaussian
    noise (σ = 0.1) and a luminance change; the negative is a crop of another image. Every patch is
    converted to grayscale with probability 0.1. Crops are cut with one batched grid_sample from an
    anti-aliased image pyramid, so zooming out never aliases.
    """

    LEVELS = 4

    def __init__(self, images: list[np.ndarray], patch_size: int, device="cpu", seed: int = 0,
                 grayscale_prob: float = 0.1, noise_std: float = 0.1):
        if len(images) < 2:
            raise ValueError("teacher pretraining needs at least 2 natural images")
        self.p = patch_size
        self.device = torch.device(device)
        self.grayscale_prob = grayscale_prob
        self.noise_std = noise_std
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.sizes = torch.tensor([img.shape[:2] for img in images], dtype=torch.float32)
        max_h = max(img.shape[0] for img in images)
        max_w = max(img.shape[1] for img in images)
        self.pyramid = []           # level l: N×3×Hl×Wl uint8, image l-times halved, zero-padded
        for level in range(self.LEVELS):
            f = 0.5 ** level
            hl, wl = math.ceil(max_h * f), math.ceil(max_w * f)
            stack = torch.zeros(len(images), 3, hl, wl, dtype=torch.uint8)
            for i, img in enumerate(images):
                t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
                if level:
                    size = (max(1, round(img.shape[0] * f)), max(1, round(img.shape[1] * f)))
                    t = F.interpolate(t, size=size, mode="bilinear", antialias=True,
                                      align_corners=False)
                stack[i, :, :t.shape[2], :t.shape[3]] = t[0].round().clamp(0, 255).to(torch.uint8)
            self.pyramid.append(stack.to(self.device))

    def _rand(self, *shape):
        return torch.rand(*shape, generator=self.generator)

    def _crop(self, index, zoom, center_y, center_x):
        """p×p crops of images `index`, zoomed by `zoom`, centred at zoomed coords (cy, cx)."""
        p = self.p
        out = torch.empty(len(index), 3, p, p, device=self.device)
        offsets = torch.arange(p, dtype=torch.float32) - p / 2 + 0.5
        # The pyramid level whose resolution is closest above the zoomed one.
        level = (-torch.log2(zoom)).floor().clamp(0, self.LEVELS - 1).long()
        for lv in level.unique().tolist():
            sel = (level == lv).nonzero().flatten()
            f = 0.5 ** lv
            src = self.pyramid[lv][index[sel].to(self.device)].float() / 255.0
            hl, wl = src.shape[-2:]
            # zoomed pixel centre → original pixel coordinate → level-l coordinate → [-1, 1]
            ys = (center_y[sel, None] + offsets) / zoom[sel, None]
            xs = (center_x[sel, None] + offsets) / zoom[sel, None]
            gy = ((ys * f) / hl) * 2 - 1
            gx = ((xs * f) / wl) * 2 - 1
            grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
            out[sel] = F.grid_sample(src, grid.to(self.device), mode="bilinear",
                                     padding_mode="border", align_corners=False)
        return out

    def _random_view(self, index):
        p = self.p
        short = self.sizes[index].min(dim=1).values
        side = torch.randint(4 * p, 16 * p + 1, (len(index),), generator=self.generator).float()
        zoom = side / short
        h, w = self.sizes[index, 0] * zoom, self.sizes[index, 1] * zoom
        cy = p / 2 + self._rand(len(index)) * (h - p)
        cx = p / 2 + self._rand(len(index)) * (w - p)
        return zoom, cy, cx, h, w

    def _grayscale(self, x):
        gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(
            1, keepdim=True)
        pick = (self._rand(len(x)) < self.grayscale_prob).to(x.device).view(-1, 1, 1, 1)
        return torch.where(pick, gray.expand_as(x), x)

    def sample(self, batch_size: int):
        n = self.sizes.shape[0]
        index = torch.randint(0, n, (batch_size,), generator=self.generator)
        zoom, cy, cx, h, w = self._random_view(index)
        anchor = self._crop(index, zoom, cy, cx)
        shift = (self.p - 1) / 4
        low = torch.full_like(cy, self.p / 2)
        py = torch.clamp(cy + (self._rand(batch_size) * 2 - 1) * shift, low, h - self.p / 2)
        px = torch.clamp(cx + (self._rand(batch_size) * 2 - 1) * shift, low, w - self.p / 2)
        positive = self._crop(index, zoom, py.round(), px.round())
        luminance = (0.8 + 0.4 * self._rand(batch_size)).to(self.device).view(-1, 1, 1, 1)
        noise = torch.randn(positive.shape, generator=self.generator).to(self.device)
        positive = (positive * luminance + self.noise_std * noise).clamp(0, 1)
        other = (index + torch.randint(1, n, (batch_size,), generator=self.generator)) % n
        nzoom, ncy, ncx, _, _ = self._random_view(other)
        negative = self._crop(other, nzoom, ncy, ncx)
        return self._grayscale(anchor), self._grayscale(positive), self._grayscale(negative)


# --- losses ----------------------------------------------------------------------------------
def decorrelation_loss(descriptors: torch.Tensor) -> torch.Tensor:
    """L_c (eq. 6): sum of squared off-diagonal entries of the descriptors' correlation matrix."""
    z = descriptors - descriptors.mean(0, keepdim=True)
    z = z / (z.norm(dim=0, keepdim=True) + 1e-8)
    corr = z.T @ z
    off = corr - torch.diag(torch.diagonal(corr))
    return (off ** 2).sum()


def mean_abs_offdiag_correlation(descriptors: torch.Tensor) -> float:
    """Quality measure of a teacher: 0 means perfectly decorrelated descriptor channels."""
    z = descriptors.double() - descriptors.double().mean(0, keepdim=True)
    z = z / (z.norm(dim=0, keepdim=True) + 1e-12)
    corr = z.T @ z
    d = corr.shape[0]
    return float((corr.abs().sum() - torch.diagonal(corr).abs().sum()) / (d * d - d))


def triplet_loss(anchor, positive, negative, margin: float) -> torch.Tensor:
    """L_m (eq. 3-4) with in-triplet hard negative mining and anchor swap."""
    d_pos = ((anchor - positive) ** 2).sum(1)
    d_neg = torch.minimum(((anchor - negative) ** 2).sum(1), ((positive - negative) ** 2).sum(1))
    return F.relu(margin + d_pos - d_neg).mean()


def _normalize(x01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def _descriptor(teacher: PatchNet, patches01: torch.Tensor) -> torch.Tensor:
    return teacher(_normalize(patches01)).flatten(1)


# --- the training loop -----------------------------------------------------------------------
def pretrain_teacher(image_paths: list[Path], out_dir: Path, config: TeacherConfig,
                     device: str = "cpu", log_every: int = 100, checkpoint_every: int = 500,
                     progress: bool = True, time_limit_s: float | None = None) -> Path:
    """Train T̂ on natural-image patches; resumes from ``out_dir/checkpoint.pt`` when present.

    Writes ``teacher_p{p}.safetensors`` (weights + JSON metadata: config, P, iterations, loss
    history, held-out quality) and returns its path. ``time_limit_s`` stops early (the metadata
    records the iterations actually done); running again resumes toward ``config.iterations``.
    """
    from edgestad.images import read_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    paths = sorted(Path(p) for p in image_paths)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(paths))
    n_hold = max(2, int(round(len(paths) * config.holdout_fraction)))
    holdout = [paths[i] for i in sorted(order[:n_hold])]
    train = [paths[i] for i in sorted(order[n_hold:])]
    images = [read_image(p) for p in train]
    sampler = PatchSampler(images, config.patch_size, device, config.seed, config.grayscale_prob,
                           config.noise_std)
    p_net = PretrainedFeatures(config.pretrained_cnn, config.cnn_weights).to(device)
    teacher = PatchNet(config.patch_size, config.descriptor_dim, config.width,
                       config.leaky_slope).to(device)
    decoder = nn.Linear(config.descriptor_dim, p_net.dim).to(device)
    params = list(teacher.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    ckpt_path = out_dir / f"checkpoint_p{config.patch_size}.pt"
    step, history = 0, []
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect={"kind": "teacher", "config": asdict(config)})
        teacher.load_state_dict(state["teacher"])
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.generator.set_state(state["sampler_rng"])
        step, history = state["step"], state["history"]

    def write_checkpoint():
        save_checkpoint(ckpt_path, {
            "kind": "teacher", "config": asdict(config), "step": step, "history": history,
            "teacher": teacher.state_dict(), "decoder": decoder.state_dict(),
            "optimizer": optimizer.state_dict(), "sampler_rng": sampler.generator.get_state()})

    holdout_set = _holdout_patches(holdout, config, device)
    bar = _progress(config.iterations, step, progress, f"teacher p={config.patch_size}")
    start = time.time()
    running = {"kd": 0.0, "metric": 0.0, "decorr": 0.0, "total": 0.0}
    count = 0
    teacher.train()
    while step < config.iterations:
        if time_limit_s is not None and time.time() - start > time_limit_s:
            write_checkpoint()
            break
        anchor, positive, negative = sampler.sample(config.batch_size)
        desc_a = _descriptor(teacher, anchor)
        loss_k = loss_m = loss_c = torch.zeros((), device=device)
        if config.lambda_k:
            loss_k = ((decoder(desc_a) - p_net(anchor, config.cnn_input_size)) ** 2).sum(1).mean()
        if config.lambda_m:
            loss_m = triplet_loss(desc_a, _descriptor(teacher, positive),
                                  _descriptor(teacher, negative), config.triplet_margin)
        if config.lambda_c:
            loss_c = decorrelation_loss(desc_a)
        loss = config.lambda_k * loss_k + config.lambda_m * loss_m + config.lambda_c * loss_c
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        for key, value in (("kd", loss_k), ("metric", loss_m), ("decorr", loss_c), ("total", loss)):
            running[key] += float(value.detach())
        count += 1
        bar.update(1)
        if step % log_every == 0 or step == config.iterations:
            entry = {"iteration": step, "seconds": round(time.time() - start, 1),
                     **{k: v / count for k, v in running.items()}}
            history.append(entry)
            bar.set_postfix(loss=f"{entry['total']:.3f}")
            running = dict.fromkeys(running, 0.0)
            count = 0
        if step % checkpoint_every == 0 or step == config.iterations:
            write_checkpoint()
    bar.close()
    teacher.eval()
    quality = evaluate_teacher(teacher, decoder, p_net, holdout_set, config)
    meta = {"kind": "edgestad-teacher", "config": asdict(config), "iterations": step,
            "pretrained_cnn": {"name": p_net.name, "weights": Path(p_net.weights).name},
            "data": {"train_images": len(train), "holdout_images": len(holdout)},
            "history": history, "holdout_quality": quality}
    return write_teacher_file(out_dir / f"teacher_p{config.patch_size}.safetensors", teacher, meta)


def _holdout_patches(paths, config: TeacherConfig, device, count: int = 1024):
    from edgestad.images import read_image
    sampler = PatchSampler([read_image(p) for p in paths], config.patch_size, device,
                           seed=12345, grayscale_prob=0.0)
    anchor, _, _ = sampler.sample(count)
    return anchor


@torch.no_grad()
def evaluate_teacher(teacher, decoder, p_net, patches01, config: TeacherConfig) -> dict:
    """Held-out distillation loss and mean |off-diagonal correlation| of the descriptors."""
    desc = torch.cat([_descriptor(teacher, chunk) for chunk in patches01.split(256)])
    result = {"holdout_patches": int(len(patches01)),
              "mean_abs_offdiag_correlation": mean_abs_offdiag_correlation(desc)}
    if decoder is not None and p_net is not None:
        target = torch.cat([p_net(chunk, config.cnn_input_size) for chunk in patches01.split(256)])
        result["holdout_kd_loss"] = float(((decoder(desc) - target) ** 2).sum(1).mean())
    return result


def _progress(total, initial, enabled, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)
