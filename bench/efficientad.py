"""EfficientAD-S (Batzner et al., WACV 2024) as a timing peer: image batch → (map, score).

Re-created from the published architecture (paper, Appendix A, and anomalib's
``src/anomalib/models/image/efficient_ad/torch_model.py``: ``SmallPatchDescriptionNetwork``,
``Encoder``, ``Decoder``, ``EfficientAdModel`` in eval mode) rather than imported: anomalib 2.7
installs here only beside torch 2.14 and the CUDA wheels, too heavy a dependency for a timing
peer. studies/efficientad_anomalib_check.py runs both in anomalib's own environment with the
same weights: identical parameter shapes (8,057,856 parameters), identical maps and scores
(max difference 0.0) and 75.9 GFLOP/frame each (results/efficientad_anomalib_check.json). The
weights are random: the model exists to be timed by ``edgestad bench --peer efficientad-s`` with
the same harness, input size and backends as ours (cost does not depend on the weights).
Training it is out of scope.

Inference path (anomalib, ``padding=False, pad_maps=True``):
- teacher PDN-S: conv 4×4/128, ReLU, avgpool 2×2/2, conv 4×4/256, ReLU, avgpool 2×2/2,
  conv 3×3/256, ReLU, conv 4×4/384 → 384 × 56×56 at 256² input; normalised by channel mean/std;
- student PDN-S: the same with 768 output channels (384 to mimic the teacher, 384 the autoencoder);
- autoencoder: encoder of six convs (4×4 stride 2 pad 1: 32, 32, 64, 64, 64; then 8×8 → 64×1×1),
  decoder of seven bilinear upsamplings each followed by conv 4×4 pad 2 (or 3×3 pad 1) with ReLU,
  last conv 3×3 to 384 channels at 56×56 (dropout layers are identity at inference, omitted);
- map_st = mean over channels of (teacher − student[:384])², map_ae = mean of
  (ae − student[384:])²; each padded by 4, bilinearly upsampled to the input size, normalised by
  its quantiles (qa, qb) and combined 0.5·st + 0.5·ae; image score = max of the map.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PDNSmall(nn.Module):
    """Patch description network, small (receptive field 33×33)."""

    def __init__(self, out_channels: int = 384, padding: bool = False):
        super().__init__()
        pad = 1 if padding else 0
        self.conv1 = nn.Conv2d(3, 128, kernel_size=4, padding=3 * pad)
        self.conv2 = nn.Conv2d(128, 256, kernel_size=4, padding=3 * pad)
        self.conv3 = nn.Conv2d(256, 256, kernel_size=3, padding=1 * pad)
        self.conv4 = nn.Conv2d(256, out_channels, kernel_size=4)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * pad)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.conv4(x)


class AEEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [3, 32, 32, 64, 64, 64]
        self.strided = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], kernel_size=4, stride=2, padding=1) for i in range(5))
        self.bottleneck = nn.Conv2d(64, 64, kernel_size=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.strided:
            x = F.relu(conv(x))
        return self.bottleneck(x)


class AEDecoder(nn.Module):
    def __init__(self, out_channels: int, input_size: tuple[int, int], padding: bool = False):
        super().__init__()
        h, w = input_size
        last = (h // 4, w // 4) if padding else (h // 4 - 8, w // 4 - 8)
        # Sizes of the seven bilinear upsamplings (anomalib's Decoder).
        self.sizes = [(h // 64 - 1, w // 64 - 1), (h // 32, w // 32), (h // 16 - 1, w // 16 - 1),
                      (h // 8, w // 8), (h // 4 - 1, w // 4 - 1), (h // 2 - 1, w // 2 - 1), last]
        self.convs = nn.ModuleList(nn.Conv2d(64, 64, kernel_size=4, padding=2) for _ in range(6))
        self.conv7 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.conv8 = nn.Conv2d(64, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for size, conv in zip(self.sizes[:6], self.convs):
            x = F.relu(conv(F.interpolate(x, size=size, mode="bilinear")))
        x = F.relu(self.conv7(F.interpolate(x, size=self.sizes[6], mode="bilinear")))
        return self.conv8(x)


class EfficientADS(nn.Module):
    """EfficientAD-S inference graph. Input N×3×H×W RGB 0..255 (uint8 or float)."""

    def __init__(self, input_size: tuple[int, int] = (256, 256), teacher_channels: int = 384,
                 padding: bool = False):
        super().__init__()
        if min(input_size) < 256:
            # Five stride-2 convs then an 8×8 conv: the encoder needs H/32 ≥ 8 and W/32 ≥ 8.
            raise ValueError(f"EfficientAD-S needs an input of at least 256×256, got {input_size}")
        self.input_size = tuple(input_size)
        self.teacher_channels = teacher_channels
        self.teacher = PDNSmall(teacher_channels, padding)
        self.student = PDNSmall(2 * teacher_channels, padding)
        self.encoder = AEEncoder()
        self.decoder = AEDecoder(teacher_channels, self.input_size, padding)
        self.pad_maps = not padding
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, -1, 1, 1))
        self.register_buffer("teacher_mean", torch.zeros(1, teacher_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, teacher_channels, 1, 1))
        # (qa_st, qb_st, qa_ae, qb_ae): the 0.9 and 0.995 quantiles of each map on validation
        # images; 0.1·(map − qa)/(qb − qa). Defaults make that the identity.
        self.register_buffer("quantiles", torch.tensor([0.0, 0.1, 0.0, 0.1]))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        x = (images.float() / 255.0 - self.input_mean) / self.input_std
        teacher = (self.teacher(x) - self.teacher_mean) / self.teacher_std
        student = self.student(x)
        ae = self.decoder(self.encoder(x))
        c = self.teacher_channels
        map_st = ((teacher - student[:, :c]) ** 2).mean(1, keepdim=True)
        map_ae = ((ae - student[:, c:]) ** 2).mean(1, keepdim=True)
        if self.pad_maps:
            map_st = F.pad(map_st, (4, 4, 4, 4))
            map_ae = F.pad(map_ae, (4, 4, 4, 4))
        map_st = F.interpolate(map_st, size=(height, width), mode="bilinear")
        map_ae = F.interpolate(map_ae, size=(height, width), mode="bilinear")
        q = self.quantiles
        map_st = 0.1 * (map_st - q[0]) / (q[1] - q[0])
        map_ae = 0.1 * (map_ae - q[2]) / (q[3] - q[2])
        anomaly_map = 0.5 * map_st + 0.5 * map_ae
        return anomaly_map, anomaly_map.amax(dim=(1, 2, 3))
