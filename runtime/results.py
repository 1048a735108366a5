"""Per-frame results: OK/NG decision, anomalous regions, and the overlay picture."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

import cv2
import numpy as np

from .errors import BackendError


@dataclass(frozen=True)
class Thresholds:
    pixel: float
    image: float
    review: float | None = None  # REVIEW band: scores in (review, image] need a person's look

    def decide(self, score: float) -> str:
        """"ng" above the image threshold, "review" inside the band, else "ok"."""
        if score > self.image:
            return "ng"
        if self.review is not None and score > self.review:
            return "review"
        return "ok"

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], pixel: float | None = None, image: float | None = None,
                      source: str = "manifest.json") -> "Thresholds":
        section = manifest.get("thresholds") or {}
        try:
            p = float(pixel if pixel is not None else section["pixel"])
            i = float(image if image is not None else section["image"])
        except (KeyError, TypeError, ValueError):
            raise BackendError(
                f"{source}: thresholds.pixel and thresholds.image are needed for OK/NG "
                f"(got {dict(section)!r}); set them with `edgestad thresholds` or pass --pixel-threshold/--image-threshold"
            ) from None
        if not (np.isfinite(p) and np.isfinite(i)):
            raise BackendError(f"{source}: thresholds must be finite numbers, got pixel={p}, image={i}")
        review = section.get("image_review")
        if review is not None:
            try:
                review = float(review)
            except (TypeError, ValueError):
                review = float("nan")
            if not np.isfinite(review):
                raise BackendError(f"{source}: thresholds.image_review must be a finite number, "
                                   f"got {section.get('image_review')!r}")
            if review >= i:
                if image is None:
                    raise BackendError(f"{source}: thresholds.image_review {review} must be below "
                                       f"thresholds.image {i}")
                review = None   # an --image-threshold override at or below the band ends the band
        return cls(pixel=p, image=i, review=review)


@dataclass(frozen=True)
class Region:
    """A connected component of map pixels above the pixel threshold."""

    area: int  # map pixels (model input resolution)
    bbox: tuple[int, int, int, int]  # x, y, w, h in frame pixels
    max_score: float

    def to_dict(self) -> dict:
        return {"area": self.area, "bbox": list(self.bbox), "max_score": round(self.max_score, 6)}


@dataclass
class FrameResult:
    index: int
    name: str
    capture_time: float  # wall clock, seconds
    capture_monotonic: float
    inference_start: float  # monotonic
    inference_end: float  # monotonic
    result_time: float  # wall clock when the result was ready
    score: float
    is_ng: bool
    regions: list[Region]
    regions_total: int  # all components, even those not listed (max_regions) or too small
    anomaly_map: np.ndarray  # float32 H x W at model input resolution
    frame: np.ndarray | None = field(default=None, repr=False)  # the captured image
    frame_color: str = "BGR"
    frame_size: tuple[int, int] = (0, 0)  # (width, height) of the captured image
    is_review: bool = False  # inside the bundle's REVIEW band (never together with is_ng)
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h of the frame the map covers (None: all)
    counts: dict | None = None  # the station's counters after this part (written into its event)

    @property
    def decision(self) -> str:
        return "ng" if self.is_ng else "review" if self.is_review else "ok"

    @property
    def flagged(self) -> bool:
        """NG or REVIEW: a part someone must act on (sinks report these)."""
        return self.is_ng or self.is_review

    @property
    def latency_ms(self) -> float:
        """Capture to result, the number that matters on a line."""
        return (self.inference_end - self.capture_monotonic) * 1000.0

    @property
    def inference_ms(self) -> float:
        return (self.inference_end - self.inference_start) * 1000.0

    def to_event(self) -> dict:
        return {
            "event": self.decision,
            "time": iso_time(self.result_time),
            "capture_time": iso_time(self.capture_time),
            "frame": self.index,
            **({"name": self.name} if self.name else {}),
            "score": round(float(self.score), 6),
            "is_ng": bool(self.is_ng),
            "decision": self.decision.upper(),
            "latency_ms": round(self.latency_ms, 3),
            "inference_ms": round(self.inference_ms, 3),
            "frame_size": list(self.frame_size),
            "regions": [r.to_dict() for r in self.regions],
            "regions_total": self.regions_total,
            **({"counts": self.counts} if self.counts is not None else {}),
        }

    def frame_bgr(self) -> np.ndarray | None:
        if self.frame is None:
            return None
        img = self.frame
        if img.dtype != np.uint8:
            img = (img.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        if img.ndim == 2 or img.shape[2] == 1:
            return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        if img.shape[2] == 4:
            return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        if self.frame_color == "RGB":
            return cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        return img


def iso_time(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(timespec="milliseconds")


def find_regions(
    anomaly_map: np.ndarray,
    pixel_threshold: float,
    frame_size: tuple[int, int],
    min_area: int = 1,
    max_regions: int = 32,
) -> tuple[list[Region], int]:
    """Connected components (8-connectivity) of ``map > pixel_threshold``, largest first.

    Boxes are scaled to frame pixels (the map covers the whole frame, resized without padding), so
    they can be drawn on or cropped from the captured image directly.
    """
    mask = (anomaly_map > pixel_threshold).astype(np.uint8)
    if not mask.any():
        return [], 0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    mh, mw = anomaly_map.shape
    sx, sy = frame_size[0] / mw, frame_size[1] / mh
    comps = [(int(stats[i, cv2.CC_STAT_AREA]), i) for i in range(1, n)]
    comps.sort(reverse=True)
    regions = []
    for area, i in comps:
        if area < min_area or len(regions) >= max_regions:
            continue
        x, y, w, h = (int(stats[i, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
        window = anomaly_map[y : y + h, x : x + w]
        peak = float(window[labels[y : y + h, x : x + w] == i].max())
        fx, fy = int(np.floor(x * sx)), int(np.floor(y * sy))
        fw, fh = int(np.ceil((x + w) * sx)) - fx, int(np.ceil((y + h) * sy)) - fy
        regions.append(Region(area, (fx, fy, fw, fh), peak))
    return regions, n - 1


def render_overlay(result: FrameResult, thresholds: Thresholds, alpha: float = 0.45) -> np.ndarray:
    """Frame with the anomaly map as a heat map, region boxes and the OK/NG verdict (BGR uint8).

    The colour scale is fixed (0 .. 2 x pixel threshold), not per frame, so a good part looks calm
    and the same defect looks the same in every frame.
    """
    base = result.frame_bgr()
    amap = result.anomaly_map
    if base is None:
        base = np.zeros((amap.shape[0], amap.shape[1], 3), np.uint8)
    h, w = base.shape[:2]
    top = 2.0 * thresholds.pixel if thresholds.pixel > 0 else float(max(amap.max(), 1e-6))
    norm = np.clip(amap / top, 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    if result.roi is None:
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
        out = cv2.addWeighted(base, 1.0 - alpha, heat, alpha, 0.0)
    else:   # the map covers the region of interest only: blend it there, outline the region
        rx, ry, rw, rh = result.roi
        out = base.copy()
        heat = cv2.resize(heat, (rw, rh), interpolation=cv2.INTER_LINEAR)
        out[ry:ry + rh, rx:rx + rw] = cv2.addWeighted(base[ry:ry + rh, rx:rx + rw], 1.0 - alpha,
                                                      heat, alpha, 0.0)
        cv2.rectangle(out, (rx, ry), (rx + rw - 1, ry + rh - 1), (200, 200, 200), 1)
    color = {"ng": (0, 0, 255), "review": (0, 165, 255)}.get(result.decision, (0, 200, 0))
    if result.flagged:   # regions only on parts judged NG / REVIEW: never red boxes on an OK part
        for r in result.regions:
            x, y, bw, bh = r.bbox
            cv2.rectangle(out, (x, y), (x + bw - 1, y + bh - 1), color, 2)
    label = f"{result.decision.upper()}  score {result.score:.3f}  {result.latency_ms:.0f} ms"
    scale = max(0.5, min(w, h) / 640)
    cv2.putText(out, label, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.putText(out, label, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, color, 2, cv2.LINE_AA)
    if result.is_ng:
        cv2.rectangle(out, (0, 0), (w - 1, h - 1), (0, 0, 255), 4)
    return out
