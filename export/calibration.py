"""Images export needs: good training images for INT8 calibration and the parity check, the test
set for the accuracy cost. All located through the bundle's provenance unless given explicitly.

The calibration images are the *training* half of the bundle's own train/validation split
(``provenance.split`` seed and fraction), so calibration never sees the validation images the
thresholds were set on, nor any test image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edgestad.bundle import Bundle
from edgestad.contract import uses_valid_box
from edgestad.images import DataError
from edgestad.datasets import MVTecCategory, bundle_split, load_images, load_test_set


class CalibrationError(ValueError):
    """Calibration or parity images cannot be found or read; the message names the folder."""


def data_folder(bundle: Bundle, data: str | os.PathLike | None = None) -> Path:
    """The dataset folder: ``data`` if given, else ``provenance.data`` of the bundle."""
    if data is not None:
        folder = Path(data)
        origin = "given"
    else:
        recorded = (bundle.manifest.get("provenance") or {}).get("data")
        if not recorded:
            raise CalibrationError(
                f"bundle {bundle.path}: manifest has no provenance.data to find good images; "
                "pass --calibration-data FOLDER")
        folder = Path(recorded)
        origin = f"recorded in {bundle.path}/manifest.json provenance.data"
    if not folder.is_dir():
        raise CalibrationError(f"data folder {folder} ({origin}) does not exist; pass --calibration-data "
                               "FOLDER with the good training images")
    return folder


def training_image_paths(bundle: Bundle, data: str | os.PathLike | None = None) -> list[Path]:
    """The training half of the bundle's train/validation split of the good images."""
    folder = data_folder(bundle, data)
    try:
        train, _val = bundle_split(bundle.manifest.get("provenance") or {}, folder)
    except DataError as exc:
        raise CalibrationError(str(exc)) from exc
    return train


def pick_evenly(paths: Sequence[Path], n: int) -> list[Path]:
    """``n`` paths spread evenly over the (sorted) list: deterministic, no RNG, covers the set."""
    paths = list(paths)
    if n <= 0:
        raise CalibrationError(f"need at least one calibration image, got n={n}")
    if n >= len(paths):
        return paths
    index = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in index]


def to_nchw(images_nhwc: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 (what edgestad.datasets.load_images returns) -> contiguous uint8 N x 3 x H x W."""
    return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))


def calibration_images(bundle: Bundle, n: int, data: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 N x 3 x H x W, valid boxes N x 4 of a letterbox bundle else None): ``n`` good
    training images at the model input size."""
    paths = pick_evenly(training_image_paths(bundle, data), n)
    try:
        images, boxes = load_images(paths, **bundle.reading, with_boxes=True)
    except DataError as exc:
        raise CalibrationError(str(exc)) from exc
    return to_nchw(images), (boxes if uses_valid_box(bundle.manifest["input"]) else None)


def test_set(bundle: Bundle, data: str | os.PathLike | None = None):
    """(images N x 3 x H x W, masks N x H x W bool, labels N, boxes N x 4 or None) of an
    MVTec-layout test set, or None when the data folder has no ``test/`` (a plain folder of good
    images). Boxes are given for letterbox bundles only."""
    folder = data_folder(bundle, data)
    if not (folder / "test").is_dir():
        return None
    try:
        images, masks, labels, _types, _paths, boxes = load_test_set(
            MVTecCategory(folder), **bundle.reading, with_boxes=True)
    except DataError as exc:
        raise CalibrationError(str(exc)) from exc
    return to_nchw(images), masks, labels, (boxes if uses_valid_box(bundle.manifest["input"]) else None)
