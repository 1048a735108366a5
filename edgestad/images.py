"""Reading and shaping single images and masks: decode, convert, resize, letterbox, region of
interest, and maps back onto the evaluation grid.

numpy + OpenCV only: the torch-free line-side runtime imports this module for its preprocessing,
so training and inference read and resize images through exactly the same code (datasets and
splits for training and evaluation are in edgestad/datasets.py).

Conventions (see the shared contracts):
- images are RGB uint8 H x W x 3; grayscale is replicated to 3 channels, alpha is dropped,
  16-bit is scaled to 8-bit over the full 0..65535 range;
- resizing uses INTER_AREA when shrinking and INTER_LINEAR when enlarging ("area_or_linear");
- masks are read grayscale, resized nearest-neighbour and binarised ``> 127``.

Every problem with input data raises :class:`DataError` naming the file or folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


MASK_SUFFIX = "_mask.png"


class DataError(ValueError):
    """Bad or missing input data; the message names the file or folder and what is wrong."""


def _check_complete(data: bytes, source: str) -> None:
    """Raise if a PNG/JPEG/BMP byte string is cut short.

    OpenCV decodes truncated PNG and JPEG files with only a warning on stderr and returns an image
    whose missing part is grey or black; such an image silently poisons training statistics, so the
    container structure is checked here first.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if not _png_complete(data):
            raise DataError(f"{source}: truncated PNG (no complete IEND chunk)")
    elif data.startswith(b"\xff\xd8"):
        if not _jpeg_complete(data):
            raise DataError(f"{source}: truncated JPEG (no end-of-image marker FFD9)")
    elif data.startswith(b"BM") and len(data) >= 6:
        declared = int.from_bytes(data[2:6], "little")
        # Some writers store 0 here; only a positive size that exceeds the file is evidence.
        if declared > len(data):
            raise DataError(f"{source}: truncated BMP ({len(data)} of {declared} bytes)")


def _png_complete(data: bytes) -> bool:
    """Walk the chunk list (length, type, data, crc) up to IEND."""
    pos = 8
    n = len(data)
    while pos + 8 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            return False
        if ctype == b"IEND":
            return True
        pos = end
    return False


def _jpeg_complete(data: bytes) -> bool:
    """Walk the marker segments and entropy-coded scans up to EOI (FFD9).

    Walking, rather than testing the last two bytes, accepts files with data appended after EOI
    (camera trailers, "motion photos") and does not mistake an embedded EXIF thumbnail's EOI for
    the end of the main image.
    """
    n = len(data)
    pos = 2
    while pos < n:
        if data[pos] != 0xFF:
            return False
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return False
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn / TEM: no length field
            continue
        if pos + 2 > n:
            return False
        seg_end = pos + int.from_bytes(data[pos : pos + 2], "big")
        if seg_end > n:
            return False
        pos = seg_end
        if marker == 0xDA:  # start of scan: skip entropy-coded data to the next real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return False
                nxt = data[pos + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:  # stuffed FF byte or restart marker
                    pos += 2
                    continue
                break  # a real marker (the outer loop skips any fill bytes before it)
    return False


def to_rgb_uint8(decoded: np.ndarray, source: str = "<image>") -> np.ndarray:
    """An OpenCV-decoded array (gray / BGR / BGRA, 8 or 16 bit) as RGB uint8 H x W x 3."""
    img = decoded
    if img.dtype == np.uint16:
        # Full-range scaling (not per-image min/max): the same grey level must map to the same
        # 8-bit value in every image, or the anomaly statistics would drift with image content.
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DataError(f"{source}: unsupported pixel type {img.dtype} (use 8- or 16-bit images)")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim != 3:
        raise DataError(f"{source}: unsupported image shape {decoded.shape}")
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise DataError(f"{source}: unsupported number of channels {channels}")


def resize_interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """INTER_AREA when no side grows (shrinking or same size), else INTER_LINEAR."""
    if dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1]:
        return cv2.INTER_AREA
    return cv2.INTER_LINEAR


def _check_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise DataError(f"size must be (height, width), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise DataError(f"size must be positive (height, width), got {size!r}")
    return h, w


def resize_image(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize an H x W x C image to ``size=(height, width)`` with the area_or_linear rule."""
    hw = _check_size(size)
    assert hw is not None
    if img.shape[:2] == hw:
        return img
    interp = resize_interpolation(img.shape[:2], hw)
    return cv2.resize(img, (hw[1], hw[0]), interpolation=interp)


LETTERBOX_PAD_VALUE = 114   # neutral grey of the padding (the YOLO convention)


def letterbox_geometry(src_hw: Sequence[int], dst_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): the image scaled to fit ``dst_hw`` with its aspect ratio kept,
    centred. The box (top, left, top + new_h, left + new_w) is what ``valid_box`` carries."""
    sh, sw = (int(v) for v in src_hw)
    dh, dw = (int(v) for v in dst_hw)
    scale = min(dh / sh, dw / sw)
    nh = min(dh, max(1, int(round(sh * scale))))
    nw = min(dw, max(1, int(round(sw * scale))))
    return nh, nw, (dh - nh) // 2, (dw - nw) // 2


def letterbox_image(img: np.ndarray, size: Sequence[int], pad_value: int = LETTERBOX_PAD_VALUE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(canvas H x W x C, box float32 [top, left, bottom, right]): aspect kept, centred, padded."""
    hw = _check_size(size)
    assert hw is not None
    nh, nw, top, left = letterbox_geometry(img.shape[:2], hw)
    canvas = np.full((hw[0], hw[1]) + img.shape[2:], pad_value, dtype=img.dtype)
    canvas[top:top + nh, left:left + nw] = resize_image(img, (nh, nw))
    return canvas, np.array([top, left, top + nh, left + nw], dtype=np.float32)


def fit_image(img: np.ndarray, size: Sequence[int], resize: str = "area_or_linear"
              ) -> tuple[np.ndarray, np.ndarray]:
    """An image at the model input size by the bundle's resize rule, and its valid box."""
    if resize == "letterbox":
        return letterbox_image(img, size)
    if resize != "area_or_linear":
        raise DataError(f"unknown resize rule {resize!r} (use area_or_linear or letterbox)")
    hw = _check_size(size)
    assert hw is not None
    return resize_image(img, hw), np.array([0, 0, hw[0], hw[1]], dtype=np.float32)


def aspect_ratios_vary(paths: Sequence[str | os.PathLike], tolerance: float = 0.02) -> bool:
    """True when the images' width/height ratios differ by more than ``tolerance`` (relative):
    such a set is letterboxed by default, since squashing would distort each image differently."""
    ratios = []
    for path in paths:
        size = image_size(path)
        ratios.append(size[1] / size[0])
    return bool(ratios) and max(ratios) / min(ratios) > 1 + tolerance


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file (decodes it: OpenCV has no header-only reader)."""
    return read_image(path).shape[:2]


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a bool H x W mask with nearest neighbour (no new label values)."""
    hw = _check_size(size)
    assert hw is not None
    if mask.shape[:2] == hw:
        return mask
    out = cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return out.astype(bool)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise DataError(f"{path}: file is empty")
    return data


def decode_image(data: bytes, source: str = "<bytes>", size: Sequence[int] | None = None) -> np.ndarray:
    """Decode encoded image bytes (PNG/JPEG/BMP/TIFF) to RGB uint8 H x W x 3."""
    hw = _check_size(size)
    _check_complete(data, source)
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise DataError(f"{source}: not a readable image (OpenCV could not decode it)")
    img = to_rgb_uint8(decoded, source)
    return resize_image(img, hw) if hw else img


def read_image(path: str | os.PathLike, size: Sequence[int] | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 H x W x 3, optionally resized to ``size=(height, width)``.

    The file is read once and decoded with ``cv2.imdecode(..., IMREAD_UNCHANGED)`` (the decoder
    ``cv2.imread`` uses) so the same bytes can be checked for truncation and non-ASCII paths work.
    """
    path = Path(path)
    return decode_image(_read_bytes(path), str(path), size)


def parse_roi(text: str | Sequence[int] | None, option: str = "--roi") -> tuple[int, int, int, int] | None:
    """"x,y,w,h" (pixels of the source images) or a sequence of four ints → (x, y, w, h);
    DataError naming the option otherwise. None stays None (no region of interest)."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(int(str(v).strip()) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or values[0] < 0 or values[1] < 0 or values[2] < 1 or values[3] < 1:
        raise DataError(f"{option}: expected x,y,w,h in pixels (x, y >= 0; w, h >= 1), got {text!r}")
    return values   # type: ignore[return-value]


def crop_roi(img: np.ndarray, roi: Sequence[int] | None, source: str = "image") -> np.ndarray:
    """The region of interest (x, y, w, h) of an H x W (x C) image; DataError naming the image
    when the region does not lie inside it."""
    if roi is None:
        return img
    x, y, w, h = (int(v) for v in roi)
    if x + w > img.shape[1] or y + h > img.shape[0]:
        raise DataError(f"{source}: the region of interest x={x} y={y} w={w} h={h} does not lie "
                        f"inside the {img.shape[1]}x{img.shape[0]} image")
    return img[y:y + h, x:x + w]


def read_mask(path: str | os.PathLike, size: Sequence[int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool H x W (``> 127``), resized nearest to ``size``."""
    path = Path(path)
    data = _read_bytes(path)
    hw = _check_size(size)
    _check_complete(data, str(path))
    gray = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None or gray.size == 0:
        raise DataError(f"{path}: not a readable mask image (OpenCV could not decode it)")
    mask = gray > 127
    return resize_mask(mask, hw) if hw else mask


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by name.

    Extensions png/jpg/jpeg/bmp/tif/tiff in any case; hidden files (e.g. macOS ``._x.png``
    resource forks) are skipped. A missing folder or one without images is a DataError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DataError(f"image folder {folder} {what}")
    images = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not images:
        raise DataError(
            f"image folder {folder} contains no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})"
        )
    return images


def map_to_eval_grid(amap: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """A model-input map (H x W) cropped to its valid box and resampled (bilinear) onto the
    H x W evaluation grid the masks are on. For a full box this is the map itself."""
    h, w = amap.shape
    top, left, bottom, right = (int(round(float(v))) for v in box)
    if (top, left, bottom, right) == (0, 0, h, w):
        return amap
    crop = np.ascontiguousarray(amap[top:bottom, left:right], dtype=np.float32)
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)


def to_eval_grid(maps: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    """``map_to_eval_grid`` of N maps and their valid boxes (``boxes`` None: the maps as they are)."""
    if boxes is None:
        return maps
    return np.stack([map_to_eval_grid(m, b) for m, b in zip(maps, boxes)])
