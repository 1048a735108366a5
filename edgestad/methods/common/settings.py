"""Settings the methods share, and their checks: torch-free, so that ``edgestad methods``,
``train --help`` and a config check before training import no model.

- the pretrained backbones' table (channels per stride, input mean/std, whether a weights file
  is needed) and ``check_backbone``;
- the image-score rules (``parse_image_score``) and the map smoothing's check;
- ``GlobalBranchSettings``: the global Gaussian branch and the score fusion;
- ``PretrainedFeatureConfig``: the config base of the pretrained-feature methods (stfpm,
  resnet_students, stfpm_ae, rstpm): backbone, input size, image score, resize rule, map
  smoothing and the global branch, with their stored defaults and checks written once;
- the options those methods share (``BACKBONE_WEIGHTS``, ``MOMENTUM``, ``WEIGHT_DECAY``,
  ``AUGMENT``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..base import ConfigMixin, MethodConfigError, Option

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED = "pretrained"     # the weights= value meaning "the backbone's own offline weights"

BACKBONES = {
    # name: (channels per stride, mean, std, needs a user weights file)
    "efficientnet-lite0": ({4: 24, 8: 40, 16: 112, 32: 320}, (0.5,) * 3, (0.5,) * 3, False),
    "efficientnet-lite1": ({4: 24, 8: 40, 16: 112, 32: 320}, (0.5,) * 3, (0.5,) * 3, False),
    "efficientnet-lite2": ({4: 24, 8: 48, 16: 120, 32: 352}, (0.5,) * 3, (0.5,) * 3, False),
    "resnet18": ({4: 64, 8: 128, 16: 256, 32: 512}, IMAGENET_MEAN, IMAGENET_STD, True),
    "resnet50": ({4: 256, 8: 512, 16: 1024, 32: 2048}, IMAGENET_MEAN, IMAGENET_STD, True),
}

MAP_SIGMA = 2.0     # default map smoothing of the pretrained-feature methods, pixels
FUSION_RULES = ("sum", "max")
NORMALIZATIONS = ("quantile", "z")
AUGMENTATIONS = ("none", "flip", "rotate")
# Where the level maps are multiplied: each upsampled to the input (the papers' wording; bundles
# made before map_grid), or on the finest level's grid, upsampled once (the default: the same maps
# to within interpolation, measured equal or better on bottle, screw and magnetic_tile, ~6 % faster;
# studies/map_grid.py)
MAP_GRIDS = ("input", "finest")


class BackboneError(ValueError):
    """A backbone name, stride or weights file is unusable; the message names it."""


def backbone_names() -> list[str]:
    return sorted(BACKBONES)


def check_backbone(name: str, strides: tuple[int, ...]) -> None:
    """BackboneError (a ValueError) naming the option when a config names an unknown backbone or
    stride: checked when the config is made, before any image is read."""
    if name not in BACKBONES:
        raise BackboneError(f"--backbone: unknown backbone {name!r}; known: {', '.join(backbone_names())}")
    channels = BACKBONES[name][0]
    if not strides or list(strides) != sorted(set(strides)) or any(s not in channels for s in strides):
        raise BackboneError(f"backbone {name}: strides must be increasing, from {sorted(channels)}; "
                            f"got {list(strides)}")


def parse_image_score(rule: str) -> tuple[str, float]:
    """('max', 0) or ('topk', fraction); ValueError naming the rule otherwise."""
    if rule == "max":
        return "max", 0.0
    if isinstance(rule, str) and rule.startswith("topk:"):
        try:
            fraction = float(rule.split(":", 1)[1])
        except ValueError:
            fraction = -1.0
        if 0.0 < fraction <= 1.0:
            return "topk", fraction
    raise ValueError(f"image score rule {rule!r}: use 'max' or 'topk:F' with 0 < F <= 1 "
                     "(mean of the top F of the map's pixels)")


def kernel_radius(sigma: float) -> int:
    """⌈4σ⌉, at least 1 (scipy.ndimage's default truncation)."""
    return max(1, math.ceil(4.0 * sigma))


def check_map_sigma(sigma: float, input_size) -> None:
    """ValueError naming ``map_sigma`` unless 0 ≤ σ and the kernel fits the input."""
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) \
            or sigma < 0:
        raise ValueError(f"map_sigma: must be a number >= 0 (pixels; 0 = no smoothing), got {sigma!r}")
    if sigma > 0 and 2 * kernel_radius(sigma) + 1 > min(input_size):
        raise ValueError(f"map_sigma: {sigma} px needs a {2 * kernel_radius(sigma) + 1}-pixel kernel, "
                         f"larger than the input {tuple(input_size)}")


def check_score_margin(margin, input_size) -> None:
    """ValueError naming ``score_margin`` unless it is a whole number of pixels >= 0 that leaves
    at least half of each side of the input to score."""
    if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
        raise ValueError(f"score_margin: must be a whole number of pixels >= 0, got {margin!r}")
    if 4 * margin > min(input_size):
        raise ValueError(f"score_margin: {margin} px leaves less than half of the input "
                         f"{tuple(input_size)} to score (at most {min(input_size) // 4})")


def check_global_settings(global_branch, global_levels, teacher_strides, score_fusion,
                          score_normalization) -> None:
    """ValueError naming the setting when a global-branch setting is unusable."""
    if not isinstance(global_branch, bool):
        raise ValueError(f"global_branch: must be true or false, got {global_branch!r}")
    levels = tuple(global_levels)
    if global_branch:
        if not levels or list(levels) != sorted(set(levels)) or \
                any(s not in teacher_strides for s in levels):
            raise ValueError(f"global_levels: strides must be increasing, from "
                             f"{sorted(teacher_strides)}; got {list(levels)}")
    if score_fusion not in FUSION_RULES:
        raise ValueError(f"score_fusion: must be one of {', '.join(FUSION_RULES)}, got {score_fusion!r}")
    if score_normalization not in NORMALIZATIONS:
        raise ValueError(f"score_normalization: must be one of {', '.join(NORMALIZATIONS)}, "
                         f"got {score_normalization!r}")


@dataclass
class GlobalBranchSettings(ConfigMixin):
    """The global branch (``global_score.py``) and the image-score fusion."""
    global_branch: bool = True                     # the Gaussian of pooled teacher features
    global_levels: tuple[int, ...] = (16, 32)      # teacher strides it pools
    score_fusion: str = "sum"                      # FUSION_RULES
    score_normalization: str = "quantile"          # NORMALIZATIONS

    # bundles from before the global branch score with the map alone
    STORED_DEFAULTS: ClassVar[dict] = {"global_branch": False}

    def check_global(self, teacher_strides) -> None:
        check_global_settings(self.global_branch, self.global_levels, teacher_strides,
                              self.score_fusion, self.score_normalization)

    def teacher_strides(self, map_levels) -> tuple[int, ...]:
        """The strides the teacher must compute: the map's and, with the branch on, the global
        branch's."""
        extra = tuple(self.global_levels) if self.global_branch else ()
        return tuple(sorted(set(map_levels) | set(extra)))


@dataclass
class PretrainedFeatureConfig(GlobalBranchSettings):
    """The config base of the methods built on a pretrained CNN teacher. A method adds its own
    fields (and may give a field another default by declaring it again) and says which strides
    its map uses (``map_levels``) and which its teacher can give the global branch
    (``teacher_levels``)."""
    backbone: str = "efficientnet-lite0"
    input_size: tuple[int, int] = (256, 256)       # (height, width)
    image_score: str = "max"                       # see methods/common/scoring.py
    resize: str = "area_or_linear"                 # or "letterbox"
    map_sigma: float = MAP_SIGMA                   # Gaussian smoothing of the map, px (0 = off)
    map_grid: str = "finest"                       # MAP_GRIDS: where the level maps are multiplied
    score_margin: int = 0                          # px of the frame's edge the map score ignores

    # bundles from before map smoothing / the global branch / the score margin
    STORED_DEFAULTS: ClassVar[dict] = {**GlobalBranchSettings.STORED_DEFAULTS, "map_sigma": 0.0,
                                       "map_grid": "input", "score_margin": 0}

    def map_levels(self) -> tuple[int, ...]:
        """The teacher strides the anomaly map uses."""
        return tuple(getattr(self, "levels", (4,)))

    def teacher_levels(self) -> tuple[int, ...]:
        """The strides the teacher can give the global branch."""
        return tuple(BACKBONES[self.backbone][0])

    def __post_init__(self):
        parse_image_score(self.image_score)
        check_backbone(self.backbone, self.map_levels())
        check_map_sigma(self.map_sigma, self.input_size)
        if self.map_grid not in MAP_GRIDS:
            raise ValueError(f"map_grid: must be one of {', '.join(MAP_GRIDS)}, got {self.map_grid!r}")
        check_score_margin(self.score_margin, self.input_size)
        self.check_global(self.teacher_levels())
        self.check()

    def check(self) -> None:
        """A method's own checks of its fields (MethodConfigError / ValueError naming them)."""


# --- options the pretrained-feature methods share ------------------------------------------------

BACKBONE_WEIGHTS = Option("backbone_weights", "file", None,
                          "local weights file of the backbone (torchvision .pth or .safetensors); "
                          "default: the backbone's own offline weights", flag="--backbone-weights")
MOMENTUM = Option("momentum", float, 0.9, "SGD momentum")
WEIGHT_DECAY = Option("weight_decay", float, 1e-4, "SGD weight decay")


def augment_option(default: str = "none") -> Option:
    return Option("augment", str, default,
                  "training augmentation: flip = random left-right mirror, rotate = also random "
                  "90° turns (for parts that lie at any angle), auto = rotate when the training "
                  "images show varied orientations, else the method's own",
                  choices=("auto",) + AUGMENTATIONS, flag="--augment")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise MethodConfigError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
