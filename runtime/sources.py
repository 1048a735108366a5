"""Frame sources: camera, video file, image folder, stream URL, GStreamer pipeline.

- ``OpenCVSource`` wraps ``cv2.VideoCapture`` for camera indices (V4L2 on Linux), video files,
  RTSP/HTTP URLs (FFmpeg) and GStreamer pipeline strings (``cv2.CAP_GSTREAMER``; pip's
  opencv-python wheels are built without GStreamer, JetPack's and distribution OpenCV have it).
- ``FolderSource`` reads the images of a folder in name order with edgestad.images' reader.
- ``ReconnectingSource`` re-opens a lost live source with exponential backoff, counted and logged.
- ``FrameGrabber`` is the capture thread. For live sources it keeps only the newest frame
  (``latest=True``): a slow consumer never builds a backlog, and every frame overwritten before it
  was used is counted as dropped. For files and folders it blocks instead, so no frame is lost.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from edgestad.images import DataError, list_images, read_image

from .errors import FrameError, SourceError

log = logging.getLogger("edgestad.runtime.sources")

SOURCE_KINDS = ("camera", "video", "folder", "url", "gstreamer")
LIVE_KINDS = ("camera", "url", "gstreamer")


@dataclass
class Frame:
    """One captured frame. ``image`` is as decoded: BGR/gray/BGRA from OpenCV, RGB from folders."""

    image: np.ndarray
    index: int  # position in the source's stream, counting every frame read (dropped ones too)
    capture_time: float  # wall clock (time.time) for logs and events
    capture_monotonic: float  # time.monotonic, for latency
    color: str = "BGR"
    name: str = ""  # file name for folders, else empty


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # one of SOURCE_KINDS
    target: str  # camera index or device path, file/folder path, URL, or pipeline string
    frame_size: tuple[int, int] | None = None  # requested (width, height) for cameras
    fps: float | None = None  # requested camera fps
    timeout_ms: int = 5000  # open/read timeout for network streams

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise SourceError(f"unknown source kind {self.kind!r}; choose one of {SOURCE_KINDS}")

    @property
    def live(self) -> bool:
        return self.kind in LIVE_KINDS

    def describe(self) -> str:
        return f"{self.kind} {redact_url(self.target) if self.kind == 'url' else self.target}"


def redact_url(url: str) -> str:
    """rtsp://user:secret@host/x -> rtsp://user:***@host/x (never log camera passwords)."""
    return re.sub(r"(//[^/:@]+):[^@/]*@", r"\1:***@", url)


class Source:
    """A frame source. ``read()`` returns a Frame, None at the end of a finite stream, raises
    SourceError when the source is lost and FrameError for one unusable frame (folders)."""

    live = False
    description = "source"

    def open(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self) -> Frame | None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def opencv_has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1].upper()
    return False


def _camera_target(target: str) -> int | str:
    text = str(target).strip()
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"/dev/video(\d+)", text)
    if m:
        return int(m.group(1))
    return text


class OpenCVSource(Source):
    """cv2.VideoCapture for camera / video / url / gstreamer."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.live = spec.live
        self.description = spec.describe()
        self.cap: Any = None
        self._index = 0
        self._first: np.ndarray | None = None  # a video file's first frame, read by open() as a probe

    def open(self) -> None:
        spec = self.spec
        if spec.kind == "gstreamer" and not opencv_has_gstreamer():
            raise SourceError(
                "this OpenCV build has no GStreamer support (pip's opencv-python wheels have none); "
                "use JetPack's / the distribution's OpenCV (e.g. apt python3-opencv) for --gstreamer",
                permanent=True,
            )
        if spec.kind == "video" and not Path(spec.target).is_file():
            raise SourceError(f"video file not found: {spec.target}")
        cap = self._make_capture()
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            hint = {
                "camera": " (is it connected, is /dev/videoN readable by this user, is another "
                "process using it?)",
                "url": " (is the stream reachable, are the credentials right?)",
                "gstreamer": " (test the pipeline with gst-launch-1.0 first)",
                "video": " (is it a video format OpenCV/FFmpeg can decode?)",
            }.get(spec.kind, "")
            raise SourceError(f"cannot open {self.description}{hint}")
        if spec.kind == "video":
            # OpenCV "opens" many files that are not videos (text, a truncated download) and then
            # reads no frame: that is an unusable source, not a video of 0 frames.
            ok, first = cap.read()
            if not ok or first is None:
                cap.release()
                raise SourceError(f"cannot read a frame from video file {spec.target} (not a video, or a format "
                                  "OpenCV/FFmpeg cannot decode)", permanent=True)
            self._first = first
        self.cap = cap

    def _make_capture(self):
        spec = self.spec
        if spec.kind == "camera":
            target = _camera_target(spec.target)
            api = getattr(cv2, "CAP_V4L2", cv2.CAP_ANY) if isinstance(target, int) else cv2.CAP_ANY
            cap = cv2.VideoCapture(target, api)
            if cap.isOpened():
                # A one-frame driver buffer: with the grabber always reading, frames are fresh.
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
                if spec.frame_size:
                    cap.set(cv2.CAP_PROP_FRAME_WIDTH, spec.frame_size[0])
                    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, spec.frame_size[1])
                if spec.fps:
                    cap.set(cv2.CAP_PROP_FPS, spec.fps)
            return cap
        if spec.kind == "gstreamer":
            return cv2.VideoCapture(spec.target, cv2.CAP_GSTREAMER)
        if spec.kind == "url":
            params = []
            # Without timeouts FFmpeg can block forever on a dead RTSP server and the reconnect
            # logic would never run.
            for name in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC"):
                if hasattr(cv2, name):
                    params += [getattr(cv2, name), int(spec.timeout_ms)]
            return cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, params)
        return cv2.VideoCapture(spec.target, cv2.CAP_ANY)

    def read(self) -> Frame | None:
        if self.cap is None:
            raise SourceError(f"{self.description} is not open")
        if self._first is not None:
            ok, image, self._first = True, self._first, None
        else:
            ok, image = self.cap.read()
        now_wall, now_mono = time.time(), time.monotonic()
        if not ok or image is None:
            if self.live:
                raise SourceError(f"{self.description}: no frame (device lost or stream ended)")
            return None  # end of the video file
        frame = Frame(image, self._index, now_wall, now_mono, "BGR")
        self._index += 1
        return frame

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class FolderSource(Source):
    """The images of a folder in name order, read like training images (edgestad.images)."""

    live = False

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.description = f"folder {self.folder}"
        self.paths: list[Path] = []
        self._pos = 0

    def open(self) -> None:
        try:
            self.paths = list_images(self.folder)
        except DataError as exc:
            raise SourceError(str(exc)) from None
        self._pos = 0

    def read(self) -> Frame | None:
        if self._pos >= len(self.paths):
            return None
        path = self.paths[self._pos]
        index = self._pos
        self._pos += 1
        try:
            image = read_image(path)
        except (DataError, OSError) as exc:
            raise FrameError(f"{path}: {exc}") from None
        return Frame(image, index, time.time(), time.monotonic(), "RGB", path.name)


def make_source(spec: SourceSpec) -> Source:
    if spec.kind == "folder":
        return FolderSource(spec.target)
    return OpenCVSource(spec)


@dataclass
class Backoff:
    """Exponential backoff: initial, initial*factor, ... capped at ``maximum`` seconds."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay
            delay = min(self.maximum, delay * self.factor)


@dataclass
class SourceCounters:
    frames_read: int = 0
    frames_bad: int = 0  # unusable single frames (FrameError)
    losses: int = 0  # times an open source was lost (read failed / stream ended)
    reconnects: int = 0  # successful re-opens after a loss
    open_failures: int = 0  # failed open attempts
    connected: bool = False
    last_error: str = ""


class ReconnectingSource:
    """Opens a source, and re-opens it with exponential backoff when it fails or a live stream ends.

    ``max_attempts``: consecutive failed opens before giving up with SourceError (None: never give
    up). ``on_event(kind, **fields)`` reports "connected", "lost", "open_failed", "reconnected" for
    the events log; ``stop`` (a threading.Event) interrupts a backoff wait at once.
    """

    def __init__(
        self,
        factory: Callable[[], Source],
        *,
        live: bool,
        description: str,
        backoff: Backoff | None = None,
        max_attempts: int | None = None,
        stop: threading.Event | None = None,
        on_event: Callable[..., None] | None = None,
    ):
        self.factory = factory
        self.live = live
        self.description = description
        self.backoff = backoff or Backoff()
        self.max_attempts = max_attempts
        self.stop = stop or threading.Event()
        self.on_event = on_event or (lambda kind, **fields: None)
        self.counters = SourceCounters()
        self._source: Source | None = None
        self._ever_connected = False
        self._next_index = 0

    def _connect(self) -> bool:
        failures = 0
        delays = self.backoff.delays()
        while not self.stop.is_set():
            source = self.factory()
            try:
                source.open()
            except SourceError as exc:
                source.close()
                failures += 1
                self.counters.open_failures += 1
                self.counters.last_error = str(exc)
                if exc.permanent:
                    raise
                if self.max_attempts is not None and failures > self.max_attempts:
                    raise SourceError(
                        f"{exc} (gave up after {failures} attempt{'s' if failures > 1 else ''})"
                    ) from None
                delay = next(delays)
                log.warning("%s; retrying in %.2f s (attempt %d)", exc, delay, failures)
                self.on_event("open_failed", error=str(exc), attempt=failures, retry_in_s=delay)
                self.stop.wait(delay)
                continue
            self._source = source
            self.counters.connected = True
            if self._ever_connected:
                self.counters.reconnects += 1
                log.info("reconnected to %s after %d failed attempt(s)", self.description, failures)
                self.on_event("reconnected", attempts=failures)
            else:
                self.on_event("connected")
            self._ever_connected = True
            return True
        return False

    def read(self) -> Frame | None:
        """Next frame; None at the end of a finite source or when stopped."""
        while not self.stop.is_set():
            if self._source is None and not self._connect():
                return None
            assert self._source is not None
            try:
                frame = self._source.read()
            except SourceError as exc:
                self._lost(str(exc))
                continue
            if frame is None:
                if not self.live:
                    return None
                self._lost(f"{self.description}: stream ended")
                continue
            # Indices continue across reconnects so events and drop counts stay unambiguous.
            frame.index = self._next_index
            self._next_index += 1
            self.counters.frames_read += 1
            return frame
        return None

    def _lost(self, reason: str) -> None:
        self.counters.losses += 1
        self.counters.connected = False
        self.counters.last_error = reason
        log.warning("source lost: %s; reconnecting", reason)
        self.on_event("lost", error=reason)
        self.close()

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None


_END = object()


class LatestSlot:
    """Holds only the newest item; an item replaced before it was taken counts as dropped."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self._has = False
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> None:
        with self._cond:
            if self._has:
                self.dropped += 1
            self._item, self._has = item, True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        """Next item, ``queue.Empty`` after ``timeout``, or the END sentinel once closed and empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._has or self._closed, timeout):
                raise queue.Empty
            if self._has:
                item, self._item, self._has = self._item, None, False
                return item
            return _END


class QueueSlot:
    """Bounded FIFO: the producer waits for the consumer, nothing is dropped (files, folders)."""

    def __init__(self, maxsize: int = 4, stop: threading.Event | None = None):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = stop
        self.dropped = 0

    def put(self, item: Any) -> None:
        while True:
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stop is not None and self._stop.is_set():
                    # Shutting down with a full queue: the consumer drains what is queued; this
                    # frame was read but will not be inferred, so it is counted as dropped.
                    if item is not _END:
                        self.dropped += 1
                    return

    def close(self) -> None:
        # The consumer also ends when the capture thread is gone and the queue is empty, so a
        # full queue at shutdown needs no END marker.
        try:
            self._q.put_nowait(_END)
        except queue.Full:
            pass

    def get(self, timeout: float | None = None) -> Any:
        return self._q.get(timeout=timeout)


def is_end(item: Any) -> bool:
    return item is _END


@dataclass
class Captured:
    """A frame and its preprocessed network input, as handed from the grabber to inference."""

    frame: Frame
    tensor: np.ndarray  # uint8 (3, H, W)
    prepared_monotonic: float = field(default_factory=time.monotonic)


class FrameGrabber(threading.Thread):
    """Capture thread: read -> validate/preprocess -> slot.

    ``prepare(frame)`` returns the network input or raises FrameError (counted as a bad frame,
    reported through ``on_bad``). Stops at the end of the source, on ``stop``, or on a fatal
    SourceError (kept in ``self.error`` for the pipeline to report).
    """

    def __init__(
        self,
        source: ReconnectingSource,
        prepare: Callable[[Frame], np.ndarray],
        slot: LatestSlot | QueueSlot,
        stop: threading.Event,
        on_bad: Callable[[FrameError, Frame | None], None] | None = None,
        max_frames: int | None = None,
        gate=None,
        on_idle: Callable[[], None] | None = None,
    ):
        super().__init__(name="edgestad-capture", daemon=True)
        self.gate = gate        # a TriggerGate: read one frame per trigger (--trigger opcua)
        self.on_idle = on_idle or (lambda: None)   # waiting for a trigger is healthy, not stuck
        self.source = source
        self.prepare = prepare
        self.slot = slot
        self.stop_event = stop
        self.on_bad = on_bad or (lambda exc, frame: None)
        self.max_frames = max_frames
        self.error: BaseException | None = None
        self.captured = 0

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                if self.max_frames is not None and self.captured >= self.max_frames:
                    break
                if self.gate is not None and not self.gate.wait(self.stop_event, timeout=0.5):
                    self.on_idle()
                    continue
                try:
                    frame = self.source.read()
                except FrameError as exc:
                    self.source.counters.frames_bad += 1
                    self.on_bad(exc, None)
                    continue
                if frame is None:
                    break
                try:
                    tensor = self.prepare(frame)
                except FrameError as exc:
                    self.source.counters.frames_bad += 1
                    self.on_bad(exc, frame)
                    continue
                self.captured += 1
                self.slot.put(Captured(frame, tensor))
        except SourceError as exc:
            self.error = exc
        except BaseException as exc:  # noqa: BLE001 - reported by the pipeline, not lost in a thread
            log.exception("capture thread failed")
            self.error = exc
        finally:
            self.source.close()
            self.slot.close()
