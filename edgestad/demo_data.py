"""The built-in demo dataset: a small MVTec-layout category generated at run time, no download.

Good images are random crops of a real texture photograph that ships with scikit-image
(``skimage.data.brick/grass/gravel``: 512 x 512 grayscale, CC0 licence), with small random
flips, rotations and brightness/contrast changes. Test defects are synthesised on crops from a
part of the photograph that training never sees (train crops come from the top 60 % of the rows,
test crops from the rest), so test goods are new texture, not memorised pixels:

- ``scratch``: a thin random polyline, much darker or brighter than the texture;
- ``stain``: a smooth random blob where the texture is blurred and its intensity shifted;
- ``contamination``: a blob filled with a patch of a *different* skimage texture.

Masks are exact: they are the set of pixels the defect overwrote. Generation is deterministic
given the arguments (numpy ``default_rng(seed)``) and takes well under a second.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from .images import DataError

TEXTURES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "stain", "contamination")
INFO_FILE = "demo_dataset.json"
_FORMAT_VERSION = 1
_TRAIN_ROWS = 0.6  # fraction of the texture's rows that train crops come from
_MAX_ANGLE = 6.0  # degrees of random rotation


def load_texture(name: str) -> np.ndarray:
    """A scikit-image texture photograph as a uint8 H x W grayscale array."""
    if name not in TEXTURES:
        raise DataError(f"unknown demo texture {name!r}; choose one of {', '.join(TEXTURES)}")
    try:
        import skimage.data
    except ImportError:
        raise DataError(
            "the demo dataset needs scikit-image (pip install 'edgestad[train]')"
        ) from None
    tex = np.asarray(getattr(skimage.data, name)())
    if tex.ndim == 3:
        tex = cv2.cvtColor(tex, cv2.COLOR_RGB2GRAY)
    return tex.astype(np.uint8)


def _random_crop(tex: np.ndarray, rows: tuple[int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size crop from ``tex[rows[0]:rows[1]]``, lightly rotated/flipped/re-lit."""
    region = tex[rows[0] : rows[1]]
    # Take a larger window so the rotated crop has no empty corners; if the region is too small
    # for a 1:1 crop, the window is scaled down to fit and resized up afterwards.
    rad = np.deg2rad(_MAX_ANGLE)
    grow = np.cos(rad) + np.sin(rad)
    side = min(int(np.ceil(size * grow)) + 2, region.shape[0], region.shape[1])
    y = int(rng.integers(0, region.shape[0] - side + 1))
    x = int(rng.integers(0, region.shape[1] - side + 1))
    window = region[y : y + side, x : x + side]
    angle = float(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE))
    m = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), angle, 1.0)
    window = cv2.warpAffine(window, m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inner = int(side / grow)
    o = (side - inner) // 2
    crop = window[o : o + inner, o : o + inner]
    if crop.shape[0] != size:
        interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (size, size), interpolation=interp)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    gain = rng.uniform(0.93, 1.07)
    offset = rng.uniform(-8.0, 8.0)
    out = crop.astype(np.float32) * gain + offset
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _scratch(img: np.ndarray, rng: np.random.Generator, **_) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = np.zeros_like(img)
    n_points = int(rng.integers(3, 6))
    start = rng.uniform(0.15, 0.85, 2) * size
    step = size * rng.uniform(0.12, 0.25)
    heading = rng.uniform(0, 2 * np.pi)
    points = [start]
    for _ in range(n_points - 1):
        heading += rng.uniform(-0.6, 0.6)
        points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    # Not clipped to the image: OpenCV clips the drawing, and clipped points would make the
    # scratch run along the border.
    pts = np.rint(np.array(points)).astype(np.int32)
    thickness = int(rng.integers(1, max(2, size // 64) + 1))
    cv2.polylines(mask, [pts.reshape(-1, 1, 2)], False, 255, thickness=thickness, lineType=cv2.LINE_8)
    target = 20.0 if rng.random() < 0.5 else 235.0
    out = img.astype(np.float32)
    m = mask > 0
    out[m] = 0.25 * out[m] + 0.75 * target
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), m


def _blob_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth irregular blob: a thresholded blurred random field inside a random ellipse."""
    mask = np.zeros((size, size), np.uint8)
    center = tuple(int(v) for v in rng.uniform(0.25, 0.75, 2) * size)
    axes = tuple(int(v) for v in rng.uniform(0.06, 0.16, 2) * size)
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=size / 24)
    noise /= noise.std() + 1e-6
    # Blur the ellipse so the noise can push its border in and out: an irregular outline.
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigmaX=size / 40)
    blob = ((soft + 0.25 * noise) > 0.5).astype(np.uint8)
    # The noise alone crosses the threshold in a few far-away specks: keep the main blob only.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(blob, connectivity=8)
    if n <= 1:
        return mask > 0
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def _stain(img: np.ndarray, rng: np.random.Generator, **_) -> tuple[np.ndarray, np.ndarray]:
    m = _blob_mask(img.shape[0], rng)
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=max(1.0, img.shape[0] / 64)).astype(np.float32)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(45, 80)
    out = img.copy()
    out[m] = np.clip(np.rint(blurred[m] + shift), 0, 255).astype(np.uint8)
    return out, m


def _contamination(
    img: np.ndarray, rng: np.random.Generator, foreign: np.ndarray, **_
) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    m = _blob_mask(size, rng)
    y = int(rng.integers(0, foreign.shape[0] - size + 1))
    x = int(rng.integers(0, foreign.shape[1] - size + 1))
    patch = foreign[y : y + size, x : x + size]
    out = img.copy()
    out[m] = patch[m]
    return out, m


_DEFECTS = {"scratch": _scratch, "stain": _stain, "contamination": _contamination}


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(array)):
        raise DataError(f"{path}: could not write image")


def make_demo_dataset(
    out_dir: str | os.PathLike,
    texture: str = "brick",
    size: int = 128,
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_defect: int = 20,
    seed: int = 0,
) -> Path:
    """Write a demo MVTec-layout category into ``out_dir`` (missing or empty) and return it.

    Defect images are spread round-robin over :data:`DEFECT_TYPES`. Images are 8-bit grayscale
    PNGs of ``size x size``; masks are ``{0, 255}`` PNGs named ``<stem>_mask.png``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"demo dataset folder {out_dir} exists and is not empty")
    if size < 16:
        raise DataError(f"demo image size must be at least 16, got {size}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise DataError("demo dataset counts must be n_train >= 1, n_test_good >= 0, n_test_defect >= 0")
    tex = load_texture(texture)
    foreign = load_texture(TEXTURES[(TEXTURES.index(texture) + 1) % len(TEXTURES)])
    split = int(round(tex.shape[0] * _TRAIN_ROWS))
    train_rows, test_rows = (0, split), (split, tex.shape[0])
    # The texture is part of the seed so that the textures do not share defect shapes.
    rng = np.random.default_rng([seed, TEXTURES.index(texture)])

    (out_dir / "train" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        _write_png(out_dir / "train" / "good" / f"{i:03d}.png", _random_crop(tex, train_rows, size, rng))
    if n_test_good:
        (out_dir / "test" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n_test_good):
        _write_png(out_dir / "test" / "good" / f"{i:03d}.png", _random_crop(tex, test_rows, size, rng))

    counters = dict.fromkeys(DEFECT_TYPES, 0)
    min_pixels = max(4, size * size // 2000)
    for i in range(n_test_defect):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        base = _random_crop(tex, test_rows, size, rng)
        for _ in range(20):  # re-draw the rare defect that would be (almost) empty
            img, mask = _DEFECTS[kind](base, rng, foreign=foreign)
            if mask.sum() >= min_pixels:
                break
        stem = f"{counters[kind]:03d}"
        counters[kind] += 1
        (out_dir / "test" / kind).mkdir(parents=True, exist_ok=True)
        (out_dir / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        _write_png(out_dir / "test" / kind / f"{stem}.png", img)
        _write_png(out_dir / "ground_truth" / kind / f"{stem}_mask.png", mask.astype(np.uint8) * 255)

    info = {
        "format_version": _FORMAT_VERSION,
        "texture": texture,
        "source": f"skimage.data.{texture}() (CC0); contamination from skimage.data."
        f"{TEXTURES[(TEXTURES.index(texture) + 1) % len(TEXTURES)]}()",
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "defects": {k: v for k, v in counters.items() if v},
        "seed": seed,
    }
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def _params(texture, size, n_train, n_test_good, n_test_defect, seed) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "texture": texture,
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "seed": seed,
    }


def ensure_demo_dataset(root: str | os.PathLike, **settings) -> Path:
    """Return the demo category folder ``root``, generating it first if it does not exist;
    ``settings`` are :func:`make_demo_dataset`'s (texture, size, n_train, ..., seed).

    Idempotent: an existing folder written with the same arguments is reused as is. It is built
    in a temporary folder beside ``root`` and renamed into place, so an interrupted run or a
    concurrent one never leaves a half-written dataset at ``root``. An existing ``root`` that is
    not this demo dataset (other arguments, or not a demo dataset at all) is a DataError rather
    than being overwritten.
    """
    root = Path(root)
    call = inspect.signature(make_demo_dataset).bind(root, **settings)
    call.apply_defaults()
    settings = {k: v for k, v in call.arguments.items() if k != "out_dir"}
    wanted = _params(**settings)
    if root.exists():
        _check_existing(root, wanted)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        make_demo_dataset(tmp, **settings)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.exists():
                raise
            # Another process finished first; use its (identical) dataset.
            _check_existing(root, wanted)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_existing(root: Path, wanted: dict) -> None:
    info_path = root / INFO_FILE
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        raise DataError(
            f"{root} exists but is not a generated demo dataset (no readable {INFO_FILE}); "
            f"remove it or choose another folder"
        ) from None
    have = {k: info.get(k) for k in wanted}
    if have != wanted:
        diff = ", ".join(f"{k}={have[k]!r} (wanted {wanted[k]!r})" for k in wanted if have[k] != wanted[k])
        raise DataError(f"demo dataset {root} was generated with other settings: {diff}")
