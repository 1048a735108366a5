"""Pseudo-anomalies as in DRAEM (Zavrtanik et al., ICCV 2021): a thresholded Perlin-noise mask
blends an anomaly-source texture into a good image.

``PseudoAnomalies(size, sources, seed)`` is the generator; calling it on a uint8 H×W×3 image
returns ``(image, mask)``: the pseudo-defective image and the bool H×W mask of exactly the pixels
whose value changed (a pixel inside the Perlin blob where the blend happens to round to the same
uint8 value is not in the mask). The same seed gives the same images and masks.

Steps (DRAEM's, in numpy/OpenCV, no imgaug):
1. Perlin noise at a random lattice resolution 2^a × 2^b (a, b in 0..6, capped by the image side),
   rotated by a random angle in [-90°, 90°], thresholded at 0.5 → the blob mask;
2. the source: a random image from ``sources`` (a list of files, e.g. the natural-image folder),
   resized to the image, or, when there is none, the good image itself rotated / flipped; then
   three random augmentations out of gamma contrast, brightness/contrast, sharpness, hue shift,
   solarize, posterize, invert, autocontrast, equalize, and a random rotation;
3. blend inside the mask with a random opacity β ∈ [0, 0.8]:
   ``out = image·(1−m) + (1−β)·source·m + β·image·m``.

A draw whose mask would cover no pixel (all noise under the threshold) is redrawn, so every call
returns a visible defect.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

THRESHOLD = 0.5
MIN_SCALE_EXP, MAX_SCALE_EXP = 0, 6
MAX_OPACITY = 0.8


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise of ``shape`` on a ``res`` lattice (values about in [-0.7, 0.7]).

    Computed on the next size divisible by ``res`` and cropped, so any shape works."""
    h, w = shape
    ry, rx = res
    ch, cw = math.ceil(h / ry), math.ceil(w / rx)        # pixels per lattice cell
    H, W = ch * ry, cw * rx
    angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    ys = (np.arange(H) / ch)[:, None]
    xs = (np.arange(W) / cw)[None, :]
    yi, xi = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - yi, xs - xi

    def dot(dy: int, dx: int) -> np.ndarray:
        g = gradients[yi + dy, xi + dx]                   # H×W×2 via broadcasting
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    n00, n10, n01, n11 = dot(0, 0), dot(1, 0), dot(0, 1), dot(1, 1)
    ty, tx = _fade(fy), _fade(fx)
    top = n00 + tx * (n01 - n00)
    bottom = n10 + tx * (n11 - n10)
    noise = math.sqrt(2) * (top + ty * (bottom - top))
    return noise[:h, :w]


def _rotate(img: np.ndarray, angle: float, border=cv2.BORDER_REFLECT_101) -> np.ndarray:
    h, w = img.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The thresholded, rotated Perlin blob mask (bool H×W); may be empty."""
    h, w = shape
    cap_y = max(0, min(MAX_SCALE_EXP, int(math.log2(max(1, h // 2)))))
    cap_x = max(0, min(MAX_SCALE_EXP, int(math.log2(max(1, w // 2)))))
    res = (2 ** int(rng.integers(MIN_SCALE_EXP, cap_y + 1)),
           2 ** int(rng.integers(MIN_SCALE_EXP, cap_x + 1)))
    noise = perlin_noise(shape, res, rng).astype(np.float32)
    noise = _rotate(noise, float(rng.uniform(-90, 90)))
    return noise > THRESHOLD


# --- anomaly-source augmentations (DRAEM's imgaug list, re-written) --------------------------------

def _gamma(img, rng):
    gamma = rng.uniform(0.5, 2.0)
    return (255.0 * (img / 255.0) ** gamma).astype(np.uint8)


def _brightness(img, rng):
    return np.clip(img.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30),
                   0, 255).astype(np.uint8)


def _sharpness(img, rng):
    blurred = cv2.GaussianBlur(img, (0, 0), 1.0)
    amount = rng.uniform(0.0, 2.0)
    return np.clip(img.astype(np.float32) * (1 + amount) - blurred * amount, 0, 255).astype(np.uint8)


def _hue(img, rng):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(img, rng):
    threshold = int(rng.integers(32, 128))
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def _posterize(img, rng):
    bits = int(rng.integers(4, 9))
    shift = 8 - bits
    return ((img >> shift) << shift).astype(np.uint8)


def _invert(img, rng):
    return (255 - img).astype(np.uint8)


def _autocontrast(img, rng):
    lo = img.min(axis=(0, 1), keepdims=True).astype(np.float32)
    hi = img.max(axis=(0, 1), keepdims=True).astype(np.float32)
    return ((img - lo) * 255.0 / np.maximum(hi - lo, 1)).astype(np.uint8)


def _equalize(img, rng):
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(3)], axis=-1)


def _affine(img, rng):
    return _rotate(img, float(rng.uniform(-45, 45)))


AUGMENTATIONS = (_gamma, _brightness, _sharpness, _hue, _solarize, _posterize, _invert,
                 _autocontrast, _equalize, _affine)


def augment_source(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three distinct random augmentations, in random order (DRAEM's SomeOf(3))."""
    for index in rng.choice(len(AUGMENTATIONS), size=3, replace=False):
        img = AUGMENTATIONS[int(index)](img, rng)
    return np.ascontiguousarray(img)


def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, opacity: float) -> np.ndarray:
    """uint8 H×W×3 image with ``source`` blended in where ``mask``: (1−β)·source + β·image."""
    m = mask[..., None].astype(np.float32)
    out = image * (1 - m) + ((1 - opacity) * source + opacity * image) * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class PseudoAnomalies:
    """Seeded pseudo-anomaly generator over images of one size.

    ``sources``: anomaly-source image files (resized to the image size when read; up to
    ``cache`` of them are kept in memory); ``None`` or empty = the image itself, augmented."""

    def __init__(self, sources: Sequence[str | Path] | None = None, seed: int = 0, cache: int = 256,
                 max_tries: int = 20):
        self.sources = [Path(p) for p in (sources or ())]
        self.rng = np.random.default_rng(seed)
        self.cache_size = cache
        self._cache: dict[tuple[int, tuple[int, int]], np.ndarray] = {}
        self.max_tries = max_tries

    def _source(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if not self.sources:
            src = np.rot90(image, k=int(self.rng.integers(0, 4))) if h == w else image
            if self.rng.random() < 0.5:
                src = src[:, ::-1]
            return np.ascontiguousarray(src)
        index = int(self.rng.integers(0, len(self.sources)))
        key = (index, (h, w))
        if key not in self._cache:
            from edgestad.images import read_image
            img = read_image(self.sources[index], (h, w))
            if len(self._cache) < self.cache_size:
                self._cache[key] = img
            return img
        return self._cache[key]

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"pseudo-anomalies need a uint8 H×W×3 image, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        out = image
        for _ in range(self.max_tries):
            blob = perlin_mask((h, w), self.rng)
            if not blob.any():
                continue
            source = augment_source(self._source(image), self.rng)
            opacity = float(self.rng.uniform(0.0, MAX_OPACITY))
            out = blend(image, source, blob, opacity)
            changed = (out != image).any(axis=-1)
            if changed.any():
                return out, changed
        return out, (out != image).any(axis=-1)


def anomaly_source_files(folder: str | Path | None = None, default_relpath: str = "natural/imagenet_sample"
                         ) -> tuple[list[Path], str]:
    """The anomaly-source images and a description: ``folder`` if given (must hold images),
    else the shared natural-image folder when present, else none (the image itself)."""
    from edgestad.images import list_images
    from edgestad.datasets import data_root
    if folder:
        return list_images(folder), str(folder)
    default = data_root() / default_relpath
    if default.is_dir():
        try:
            return list_images(default), str(default)
        except ValueError:
            pass
    return [], "the good image itself, augmented (no anomaly-source folder found)"
