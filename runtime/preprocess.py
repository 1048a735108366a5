"""Frame preprocessing exactly as the bundle manifest says (and as training read its images).

The graph takes ``images``: uint8 N x 3 x H x W RGB, 0..255; every arithmetic step (cast, /255,
mean/std) is inside the graph. So the runtime only converts colour, resizes with the manifest's
rule and transposes. The conversion and resize are edgestad.images' own functions (the training
readers use them), so a camera frame and a training image of the same pixels reach the graph as
the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edgestad.contract import RESIZE_RULES
from edgestad.images import (LETTERBOX_PAD_VALUE, DataError, crop_roi, letterbox_geometry, letterbox_image,
                             parse_roi, resize_image, to_rgb_uint8)

from .errors import BackendError, FrameError



@dataclass(frozen=True)
class InputSpec:
    """The manifest ``input`` section the runtime relies on."""

    height: int
    width: int
    channels: int = 3
    color: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "uint8"
    resize: str = "area_or_linear"
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h of the frame the model sees

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], source: str = "manifest.json") -> "InputSpec":
        section = manifest.get("input")
        if not isinstance(section, Mapping):
            raise BackendError(f"{source}: no 'input' section; cannot know how to preprocess frames")
        try:
            spec = cls(
                height=int(section["height"]),
                width=int(section["width"]),
                channels=int(section.get("channels", 3)),
                color=str(section.get("color", "RGB")),
                layout=str(section.get("layout", "NCHW")),
                dtype=str(section.get("dtype", "uint8")),
                resize=str(section.get("resize", "area_or_linear")),
                roi=parse_roi(section.get("roi"), "input.roi"),
            )
        except (KeyError, TypeError, ValueError, DataError) as exc:
            raise BackendError(f"{source}: bad 'input' section {dict(section)!r}: {exc}") from None
        # Refuse what this runtime would silently get wrong rather than guess.
        problems = []
        if spec.height <= 0 or spec.width <= 0:
            problems.append(f"size {spec.height}x{spec.width}")
        if spec.channels != 3:
            problems.append(f"channels={spec.channels} (runtime feeds 3)")
        if spec.color.upper() != "RGB":
            problems.append(f"color={spec.color!r} (runtime feeds RGB)")
        if spec.layout.upper() != "NCHW":
            problems.append(f"layout={spec.layout!r} (runtime feeds NCHW)")
        if spec.dtype != "uint8":
            problems.append(f"dtype={spec.dtype!r} (runtime feeds uint8)")
        if spec.resize not in RESIZE_RULES:
            problems.append(f"resize={spec.resize!r} (supported: {', '.join(RESIZE_RULES)})")
        if problems:
            raise BackendError(f"{source}: unsupported input preprocessing: " + "; ".join(problems))
        return spec


class Preprocessor:
    """Frame (OpenCV BGR/gray/BGRA, or RGB from the folder reader) -> uint8 3 x H x W RGB.

    ``frame_size=(width, height)`` optionally pins the frame size the source must deliver (a camera
    that suddenly delivers another resolution is misconfigured); None accepts any size.
    """

    def __init__(self, spec: InputSpec, frame_size: tuple[int, int] | None = None):
        self.spec = spec
        self.size_hw = (spec.height, spec.width)
        self.frame_size = tuple(frame_size) if frame_size else None

    def roi_frame(self, frame: np.ndarray, source: str = "frame") -> np.ndarray:
        """The part of the frame the model sees: the bundle's region of interest (or all)."""
        try:
            return crop_roi(frame, self.spec.roi, source)
        except DataError as exc:
            raise FrameError(str(exc)) from None

    def roi_offset(self) -> tuple[int, int]:
        """(x, y) of the region of interest in the frame."""
        return (0, 0) if self.spec.roi is None else (self.spec.roi[0], self.spec.roi[1])

    def validate(self, frame: np.ndarray, source: str = "frame") -> None:
        if not isinstance(frame, np.ndarray):
            raise FrameError(f"{source}: not an image array ({type(frame).__name__})")
        if frame.size == 0 or frame.ndim not in (2, 3) or frame.shape[0] < 1 or frame.shape[1] < 1:
            raise FrameError(f"{source}: empty or malformed frame of shape {frame.shape}")
        channels = 1 if frame.ndim == 2 else frame.shape[2]
        if channels not in (1, 3, 4):
            raise FrameError(
                f"{source}: frame has {channels} channels; expected 3 (BGR), 1 (gray) or 4 (BGRA)"
            )
        if frame.dtype not in (np.uint8, np.uint16):
            raise FrameError(f"{source}: frame pixel type {frame.dtype}; expected uint8 or uint16")
        if self.frame_size is not None:
            w, h = self.frame_size
            if frame.shape[1] != w or frame.shape[0] != h:
                raise FrameError(
                    f"{source}: frame is {frame.shape[1]}x{frame.shape[0]}, configured frame_size "
                    f"is {w}x{h}"
                )

    @property
    def letterbox(self) -> bool:
        return self.spec.resize == "letterbox"

    def valid_box(self, frame_hw: tuple[int, int]) -> np.ndarray | None:
        """Letterbox bundles: (top, left, bottom, right) of a frame of this size on the canvas;
        None for squashing bundles (the whole canvas is image)."""
        if not self.letterbox:
            return None
        nh, nw, top, left = letterbox_geometry(frame_hw[:2], self.size_hw)
        return np.array([top, left, top + nh, left + nw], dtype=np.float32)

    def __call__(self, frame: np.ndarray, color: str = "BGR", source: str = "frame") -> np.ndarray:
        """One frame -> contiguous uint8 array (3, H, W), RGB (its region of interest, if any)."""
        self.validate(frame, source)
        frame = self.roi_frame(frame, source)
        if self.letterbox:
            try:
                rgb = frame if color == "RGB" and frame.ndim == 3 and frame.shape[2] == 3 \
                    else to_rgb_uint8(frame, source)
                canvas, _ = letterbox_image(rgb, self.size_hw, LETTERBOX_PAD_VALUE)
            except DataError as exc:
                raise FrameError(str(exc)) from None
            return np.ascontiguousarray(canvas.transpose(2, 0, 1))
        try:
            if color == "RGB":
                rgb = frame if frame.ndim == 3 and frame.shape[2] == 3 else to_rgb_uint8(frame, source)
                small = resize_image(rgb, self.size_hw)
            elif frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3:
                # Resize first, convert after: per-channel resize commutes with the BGR->RGB
                # permutation bit for bit, and converting the small image is cheaper.
                small = to_rgb_uint8(resize_image(frame, self.size_hw), source)
            else:
                # 16-bit scaling does not commute with resizing: follow the training order.
                small = resize_image(to_rgb_uint8(frame, source), self.size_hw)
        except DataError as exc:
            raise FrameError(str(exc)) from None
        return np.ascontiguousarray(small.transpose(2, 0, 1))

    def batch(self, frame: np.ndarray, color: str = "BGR", source: str = "frame") -> np.ndarray:
        """One frame -> (1, 3, H, W)."""
        return self(frame, color, source)[None]
