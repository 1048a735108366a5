"""Patch descriptor networks of Uninformed Students and their fast dense form.

A *patch network* T̂ maps a p×p image patch to one d-dimensional descriptor (p = receptive field).
Applied to a whole image with its strided max-poolings, it yields descriptors only every
2^k pixels (k = number of poolings). Bailer et al.'s fast dense extraction turns the same weights into
a network T that gives the descriptor of *every* pixel in one pass: each stride-2 pooling becomes a
stride-1 pooling and every later layer is dilated by the accumulated factor.

TensorRT cannot run dilated max-pooling, so the stride-1 pooling is written as the maximum of shifted
slices (exactly equal). ``dense_stride = 2^j`` keeps the first j poolings strided: the output is then
exactly the dense map sampled every 2^j pixels at 4^j times fewer operations (tested in
tests/test_patchnet.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Layer tables. ("conv", kernel, channels) where channels is a multiple of `width`
# (the paper's 128) so the width lever scales the whole net; ("pool",) is a 2×2/2 max-pooling.
# p=65 is the paper's Table 4 verbatim. Its floor poolings make the descriptor depend on the top-left
# 60×60 pixels of the 65×65 patch (65→61→30→26→13→9→4→1); T̂ on the 65×65 crop is still what the
# dense map reproduces exactly. p=17 and p=33 are our stacks whose receptive field is exactly p
# (no pixel dropped by pooling).
ARCHITECTURES: dict[int, list[tuple]] = {
    17: [("conv", 4, 1), ("pool",), ("conv", 5, 1), ("conv", 3, 2)],
    33: [("conv", 4, 1), ("pool",), ("conv", 4, 1), ("pool",), ("conv", 4, 1), ("conv", 3, 2)],
    65: [("conv", 5, 1), ("pool",), ("conv", 5, 1), ("pool",), ("conv", 5, 1), ("pool",),
         ("conv", 4, 2)],
}


def receptive_field(patch_size: int) -> int:
    """Pixels (per side) a descriptor actually depends on, from the layer table."""
    field, jump = 1, 1
    for layer in ARCHITECTURES[patch_size]:
        kernel = layer[1] if layer[0] == "conv" else 2
        field += (kernel - 1) * jump
        if layer[0] == "pool":
            jump *= 2
    return field


def num_poolings(patch_size: int) -> int:
    return sum(1 for layer in ARCHITECTURES[patch_size] if layer[0] == "pool")


class DenseLayerStack(nn.Module):
    """The layer walk and the fast dense sampling, shared by ``PatchNet`` and the fused ensemble
    (``fused.FusedPatchEnsemble``). Subclasses set ``patch_size``, ``layout`` (a row of
    ``ARCHITECTURES``), ``convs`` (one per "conv" row plus the final 1×1, plain or grouped) and
    ``leaky_slope``."""

    @property
    def num_poolings(self) -> int:
        return num_poolings(self.patch_size)

    def _run(self, x: torch.Tensor, strided_pools: int) -> torch.Tensor:
        """Shared body: the first `strided_pools` poolings stride 2, the rest stride 1 + dilation."""
        dilation = 1
        conv_index = 0
        pool_index = 0
        for layer in self.layout:
            if layer[0] == "conv":
                conv = self.convs[conv_index]
                x = F.conv2d(x, conv.weight, conv.bias, dilation=dilation, groups=conv.groups)
                x = F.leaky_relu(x, self.leaky_slope)
                conv_index += 1
            else:
                if pool_index < strided_pools:
                    x = F.max_pool2d(x, 2, 2)
                else:
                    x = shifted_max_pool(x, dilation)
                    dilation *= 2
                pool_index += 1
        last = self.convs[conv_index]
        return F.conv2d(x, last.weight, last.bias, groups=last.groups)

    def dense(self, image: torch.Tensor, dense_stride: int = 1,
              padding_mode: str = "reflect") -> torch.Tensor:
        """Descriptor map of an N×C×H×W image, sampled every s = dense_stride pixels.

        Output (i, j) is T̂ of the p×p crop centred on pixel (i·s, j·s) (crop rows
        i·s − p//2 … i·s − p//2 + p − 1) of the image padded with `padding_mode`. There are
        ceil((H−1)/s) + 1 rows (likewise columns): the last sample lies at or past the last pixel,
        so the map can be interpolated (align_corners) to every pixel of the image. s = 1 gives H×W.
        """
        k = strided_pools_for(dense_stride, self.num_poolings)
        height, width = image.shape[-2:]
        rows = samples_covering(height, dense_stride)
        cols = samples_covering(width, dense_stride)
        # Enough padding that every output position's full p×p crop exists, plus the slack the
        # floor of strided poolings needs; the surplus outputs are cropped away below.
        before = self.patch_size // 2
        after_h = (rows - 1) * dense_stride + self.patch_size - before - height + 2 ** k
        after_w = (cols - 1) * dense_stride + self.patch_size - before - width + 2 ** k
        padded = F.pad(image, (before, after_w, before, after_h), mode=padding_mode)
        out = self._run(padded, strided_pools=k)
        return out[..., :rows, :cols]


class PatchNet(DenseLayerStack):
    """T̂ of the paper: p×p patch → d-dim descriptor (leaky ReLU between layers, none on the output).

    ``forward`` is the plain strided network (what training uses); ``dense`` is the fast dense
    network T sharing the same weights.
    """

    def __init__(self, patch_size: int = 65, descriptor_dim: int = 128, width: int = 128,
                 leaky_slope: float = 5e-3, in_channels: int = 3):
        super().__init__()
        if patch_size not in ARCHITECTURES:
            raise ValueError(f"patch_size must be one of {sorted(ARCHITECTURES)}, got {patch_size}")
        self.patch_size = patch_size
        self.descriptor_dim = descriptor_dim
        self.width = width
        self.leaky_slope = leaky_slope
        self.layout = ARCHITECTURES[patch_size]
        convs = []
        channels = in_channels
        for layer in self.layout:
            if layer[0] == "conv":
                _, kernel, mult = layer
                convs.append(nn.Conv2d(channels, width * mult, kernel))
                channels = width * mult
        convs.append(nn.Conv2d(channels, descriptor_dim, 1))  # the final 1×1 "decode" layer
        self.convs = nn.ModuleList(convs)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Strided T̂: a p×p input gives a 1×1 descriptor; a larger one gives one every 2^k px."""
        return self._run(x, strided_pools=self.num_poolings)


def samples_covering(length: int, stride: int) -> int:
    """Samples at 0, s, 2s, ... needed so the last one is at or beyond pixel length − 1."""
    return math.ceil((length - 1) / stride) + 1


def strided_pools_for(dense_stride: int, num_pools: int) -> int:
    """Number of leading poolings kept strided for a dense stride (a power of two)."""
    k = int(round(math.log2(dense_stride))) if dense_stride >= 1 else -1
    if dense_stride < 1 or 2 ** k != dense_stride:
        raise ValueError(f"dense_stride must be a power of two (1, 2, 4, ...), got {dense_stride}")
    if k > num_pools:
        raise ValueError(f"dense_stride {dense_stride} exceeds the network's total stride "
                         f"{2 ** num_pools}")
    return k


def shifted_max_pool(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """2×2 max-pooling with stride 1 and the given dilation, as maxima of shifted slices.

    Equals ``F.max_pool2d(x, 2, stride=1, dilation=dilation)`` but uses only Slice and Max, which
    TensorRT runs (it has no dilated pooling).
    """
    d = dilation
    h, w = x.shape[-2] - d, x.shape[-1] - d
    top = torch.maximum(x[..., :h, :w], x[..., :h, d:d + w])
    bottom = torch.maximum(x[..., d:d + h, :w], x[..., d:d + h, d:d + w])
    return torch.maximum(top, bottom)
