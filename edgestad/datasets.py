"""Datasets for training and evaluation: the shared data root, MVTec-layout categories, good
images and their train/validation split, loading many images at once, and a fingerprint of the
images a model was trained on. Single images are read and shaped by edgestad/images.py.

Every problem with input data raises :class:`edgestad.images.DataError` naming the file or folder.
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .images import (DataError, MASK_SUFFIX, _check_size, crop_roi, fit_image, list_images, read_image, read_mask, resize_mask)

GOOD = "good"


# The default data root is the project's sibling folder ../shared/data (see /work/shared/data's
# README); this file is <repo>/edgestad/datasets.py.
_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The folder holding the shared real datasets: ``$EDGESTAD_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("EDGESTAD_DATA", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    return (_REPO_ROOT.parent / "shared" / "data").resolve()


def require_dataset(relpath: str | os.PathLike) -> Path:
    """``data_root() / relpath`` if it is a folder, else a DataError (tests skip on it)."""
    path = data_root() / relpath
    if not path.is_dir():
        raise DataError(
            f"dataset {str(relpath)!r} not found: {path} is not a folder "
            f"(set EDGESTAD_DATA to the folder that holds the shared data)"
        )
    return path


@dataclass(frozen=True)
class TestItem:
    """One test image of an MVTec-layout category; ``mask_path`` is None for ``good`` images."""

    __test__ = False  # not a pytest test class despite the name

    path: Path
    defect_type: str
    mask_path: Path | None
    is_anomalous: bool


class MVTecCategory:
    """One category in the MVTec AD layout::

        <root>/train/good/*.png
        <root>/test/good/*.png
        <root>/test/<defect>/<stem>.png
        <root>/ground_truth/<defect>/<stem>_mask.png
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset category {self.root} does not exist or is not a folder")
        if not (self.root / "train" / GOOD).is_dir() and not (self.root / "test").is_dir():
            raise DataError(
                f"{self.root} is not an MVTec-layout category (neither train/good nor test/ exists)"
            )

    @staticmethod
    def is_category(path: str | os.PathLike) -> bool:
        """True when ``path`` has a ``train/good`` folder."""
        return (Path(path) / "train" / GOOD).is_dir()

    @property
    def name(self) -> str:
        return self.root.name

    def __repr__(self) -> str:
        return f"MVTecCategory({str(self.root)!r})"

    def train_good(self) -> list[Path]:
        return list_images(self.root / "train" / GOOD)

    def _test_dirs(self) -> list[Path]:
        test = self.root / "test"
        if not test.is_dir():
            raise DataError(f"{self.root} has no test/ folder")
        dirs = sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not dirs:
            raise DataError(f"test folder {test} has no sub-folders (expected good/ and defect types)")
        return dirs

    def defect_types(self) -> list[str]:
        """Names of the defect folders under test/ (everything except ``good``), sorted."""
        return [d.name for d in self._test_dirs() if d.name != GOOD]

    def mask_path_for(self, image: Path, defect_type: str) -> Path:
        return self.root / "ground_truth" / defect_type / (image.stem + MASK_SUFFIX)

    def test_items(self) -> list[TestItem]:
        """All test images, sorted by defect type then name; defect images must have masks."""
        items: list[TestItem] = []
        for d in self._test_dirs():
            for img in list_images(d):
                if d.name == GOOD:
                    items.append(TestItem(img, GOOD, None, False))
                    continue
                mask = self.mask_path_for(img, d.name)
                if not mask.is_file():
                    raise DataError(f"defect image {img} has no ground-truth mask; expected {mask}")
                items.append(TestItem(img, d.name, mask, True))
        return items


def good_images(path: str | os.PathLike) -> list[Path]:
    """Defect-free training images: ``path/train/good`` for an MVTec category, else ``path``."""
    path = Path(path)
    if MVTecCategory.is_category(path):
        return MVTecCategory(path).train_good()
    return list_images(path)


def _relative_names(paths: Sequence[Path]) -> list[str]:
    """Names relative to the paths' common folder, so a dataset can move without changing them."""
    if not paths:
        return []
    absolute = [os.path.abspath(p) for p in paths]
    base = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [Path(os.path.relpath(p, base)).as_posix() for p in absolute]


def split_train_val(
    paths: Iterable[str | os.PathLike],
    val_fraction: float,
    seed: int = 0,
    min_val: int = 1,
) -> tuple[list[Path], list[Path]]:
    """Split defect-free images into (train, val), both sorted by name.

    The validation images are never trained on; they give the per-scale score statistics
    (mean/std of the regression error and the predictive variance) used to normalise anomaly maps,
    and the defect-free score distribution the thresholds are set from.

    Deterministic and independent of the input order and of where the dataset lives: each image is
    ranked by ``sha256(f"{seed}:{relative name}")`` (a seeded permutation of the sorted set that
    does not depend on numpy's random stream) and the first ``n_val`` ranks go to val.
    ``n_val = max(min_val, round(val_fraction * n))``; at least one image stays in train.
    Duplicate paths are counted once, so an image cannot land in both halves.
    """
    unique = sorted({Path(p) for p in paths})
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val < 0:
        raise DataError(f"min_val must be >= 0, got {min_val}")
    n = len(unique)
    n_val = max(int(min_val), int(round(val_fraction * n)))
    if n_val >= n:
        raise DataError(
            f"cannot split {n} image(s) into train and {n_val} validation image(s); "
            f"need at least {n_val + 1} defect-free images"
        )
    names = _relative_names(unique)
    ranks = sorted(
        range(n), key=lambda i: hashlib.sha256(f"{seed}:{names[i]}".encode()).hexdigest()
    )
    val_idx = set(ranks[:n_val])
    train = [p for i, p in enumerate(unique) if i not in val_idx]
    val = [p for i, p in enumerate(unique) if i in val_idx]
    return train, val


# bundles made before the split was recorded were split at the default of that time
LEGACY_SPLIT = {"val_fraction": 0.1, "seed": 0}


def bundle_split(provenance: dict, folder: str | os.PathLike | None = None
                 ) -> tuple[list[Path], list[Path]]:
    """The (training, validation) good images a bundle was made from: the good images of its data
    folder (``provenance["data"]``, or ``folder`` where the user names another copy), split again
    by the fraction and seed training recorded (``provenance["split"]``; ``LEGACY_SPLIT`` where
    none is recorded). The one place a study, a refit or int8 calibration finds them."""
    split = {**LEGACY_SPLIT, **(provenance.get("split") or {})}
    data = folder if folder is not None else provenance.get("data")
    if data is None:
        raise DataError("the bundle records no data folder (provenance.data); name the folder")
    return split_train_val(good_images(Path(data)), float(split["val_fraction"]), int(split["seed"]))


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm  # optional (train extra); the runtime never asks for progress
    except ImportError:
        return _plain_progress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, unit="img")


def _plain_progress(iterable, total: int, desc: str):
    step = max(1, total // 10)
    for i, item in enumerate(iterable, 1):
        if i % step == 0 or i == total:
            print(f"{desc}: {i}/{total}", file=sys.stderr, flush=True)
        yield item


def _default_workers() -> int:
    # OpenCV releases the GIL while decoding and resizing, so threads give a real speed-up.
    return min(8, os.cpu_count() or 1)


def load_images(
    paths: Sequence[str | os.PathLike],
    size: Sequence[int],
    progress: bool = False,
    workers: int | None = None,
    resize: str = "area_or_linear",
    with_boxes: bool = False,
    roi: Sequence[int] | None = None,
):
    """Read and resize images into one uint8 array N x H x W x 3 (RGB), in the order given.

    ``resize``: the bundle's rule (``area_or_linear`` squashes, ``letterbox`` keeps the aspect
    ratio and pads). ``with_boxes``: also return the valid boxes (float32 N x 4). ``roi``: crop
    each image to this region of interest (x, y, w, h) first."""
    hw = _check_size(size)
    assert hw is not None
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no image paths given to load")
    out = np.empty((len(paths), hw[0], hw[1], 3), dtype=np.uint8)
    boxes = np.empty((len(paths), 4), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
        results = pool.map(lambda p: fit_image(crop_roi(read_image(p), roi, str(p)), hw, resize),
                           paths)
        for i, (img, box) in enumerate(_progress(results, len(paths), progress, "loading images")):
            out[i] = img
            boxes[i] = box
    return (out, boxes) if with_boxes else out


def _load_test_item(item: TestItem, hw: tuple[int, int], resize: str = "area_or_linear",
                    roi: Sequence[int] | None = None):
    image = read_image(item.path)
    if item.mask_path is None:
        mask = np.zeros(hw, dtype=bool)
    else:
        mask = read_mask(item.mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"mask {item.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{item.path} is {image.shape[1]}x{image.shape[0]} (width x height)"
            )
        mask = resize_mask(crop_roi(mask, roi, str(item.mask_path)), hw)
    image = crop_roi(image, roi, str(item.path))
    fitted, box = fit_image(image, hw, resize)
    return fitted, mask, box


def load_test_set(
    category: MVTecCategory | str | os.PathLike,
    size: Sequence[int],
    progress: bool = False,
    workers: int | None = None,
    resize: str = "area_or_linear",
    with_boxes: bool = False,
    roi: Sequence[int] | None = None,
):
    """All test images of a category at ``size`` (each image and mask cropped to ``roi`` first).

    Masks are always on the plain ``size`` grid (squashed, nearest): the evaluation grid. With
    ``resize="letterbox"`` the images are letterboxed and ``with_boxes`` returns their valid boxes
    as a sixth element, so a map can be cropped to its box and resampled onto that grid.

    Returns ``(images N x H x W x 3 uint8, masks N x H x W bool, labels N int64 (1 = anomalous),
    defect_types, paths)`` in :meth:`MVTecCategory.test_items` order. Good images get all-zero
    masks; an all-zero mask on a defect image is valid (it is anomalous at image level and adds no
    positive pixels). A mask whose size differs from its image's is a DataError.
    """
    cat = category if isinstance(category, MVTecCategory) else MVTecCategory(category)
    hw = _check_size(size)
    assert hw is not None
    items = cat.test_items()
    images = np.empty((len(items), hw[0], hw[1], 3), dtype=np.uint8)
    masks = np.empty((len(items), hw[0], hw[1]), dtype=bool)
    boxes = np.empty((len(items), 4), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
        results = pool.map(lambda it: _load_test_item(it, hw, resize, roi), items)
        for i, (img, mask, box) in enumerate(_progress(results, len(items), progress,
                                                        "loading test set")):
            images[i] = img
            masks[i] = mask
            boxes[i] = box
    labels = np.array([int(it.is_anomalous) for it in items], dtype=np.int64)
    result = (images, masks, labels, [it.defect_type for it in items], [it.path for it in items])
    return result + (boxes,) if with_boxes else result


_FINGERPRINT_CHUNK = 64 * 1024


def _file_digest(path: Path) -> str:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_FINGERPRINT_CHUNK)
            if size > 2 * _FINGERPRINT_CHUNK:
                f.seek(size - _FINGERPRINT_CHUNK)
                tail = f.read(_FINGERPRINT_CHUNK)
            else:
                tail = f.read()  # the rest (the head already covers small files)
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist (cannot fingerprint it)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return hashlib.sha256(head + tail).hexdigest()


def fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """A sha256 hex digest identifying a set of data files, for bundle provenance.

    Covers, for every file sorted by its name relative to the files' common folder: that name,
    the file size, and a sha256 of its first and last 64 KiB. Hashing whole files would take
    minutes on large sets; head + tail + size catches re-encoded, replaced, added, removed and
    renamed files, but not an edit confined to the middle of a large file. Modification times
    are left out on purpose: copying a dataset must not change its fingerprint, and neither does
    moving it or the order the paths are given in.
    """
    unique = sorted({Path(p) for p in paths})
    names = _relative_names(unique)
    order = sorted(range(len(unique)), key=lambda i: names[i])
    h = hashlib.sha256()
    h.update(f"edgestad-fingerprint-v1 {len(unique)}\n".encode())
    for i in order:
        p = unique[i]
        digest = _file_digest(p)
        h.update(f"{names[i]}\t{p.stat().st_size}\t{digest}\n".encode())
    return h.hexdigest()
