"""The runtime pipeline: capture thread -> inference (calling thread) -> output thread -> sinks.

- Capture (``FrameGrabber``) reads and preprocesses frames. Live sources use a one-frame slot
  (latest-frame policy, overwritten frames counted as dropped); files and folders a small blocking
  queue, so every frame is processed.
- Inference runs in the thread that calls ``run()``: batch of one, lowest latency.
- The output thread feeds the sinks (events log, NG store, HTTP feed, webhook, ...) so disk and
  network never stall inference. Results are queued without loss.

``stop()`` (SIGTERM/SIGINT) stops capture; frames already captured are still inferred, every
result reaches the sinks, the sinks are flushed and closed, and ``run()`` returns normally.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .backends import Backend
from .errors import EXIT_MODEL, BackendError, FrameError, RuntimeFailure
from .notify import SystemdNotifier, WatchdogFeeder
from .preprocess import Preprocessor
from .results import FrameResult, Region, Thresholds, find_regions
from .sinks import Sink, lifecycle_event
from .sources import (
    Backoff,
    Captured,
    Frame,
    FrameGrabber,
    LatestSlot,
    QueueSlot,
    ReconnectingSource,
    SourceSpec,
    is_end,
    make_source,
)

log = logging.getLogger("edgestad.runtime.pipeline")

MAX_CONSECUTIVE_INFERENCE_ERRORS = 10


class InferenceFailure(RuntimeFailure):
    exit_code = EXIT_MODEL


@dataclass
class RunSummary:
    source: str
    backend: str
    frames_captured: int
    frames_processed: int
    frames_dropped: int
    frames_bad: int
    ng_count: int
    reconnects: int
    source_losses: int
    inference_errors: int
    sink_errors: int
    elapsed_s: float
    fps: float
    stopped_by_signal: bool
    review_count: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class LatencyWindow:
    """Recent latencies for percentiles and recent completion times for fps (thread-safe enough:
    appends happen in one thread, readers copy)."""

    def __init__(self, size: int = 2048, fps_window_s: float = 5.0):
        self.latency = collections.deque(maxlen=size)
        self.inference = collections.deque(maxlen=size)
        self.done = collections.deque(maxlen=4096)
        self.fps_window_s = fps_window_s

    def add(self, latency_ms: float, inference_ms: float, t: float) -> None:
        self.latency.append(latency_ms)
        self.inference.append(inference_ms)
        self.done.append(t)

    def percentiles(self, which: str = "latency", qs: Sequence[float] = (0.5, 0.9, 0.99)) -> dict:
        data = np.asarray(list(getattr(self, which)), dtype=np.float64)
        if data.size == 0:
            return {q: None for q in qs}
        return {q: float(np.quantile(data, q)) for q in qs}

    def fps(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        times = [t for t in list(self.done) if now - t <= self.fps_window_s]
        if len(times) < 2:
            return 0.0
        span = max(now - times[0], times[-1] - times[0])
        return (len(times) - 1) / span if span > 0 else 0.0


class Pipeline:
    def __init__(
        self,
        source: SourceSpec,
        backend: Backend,
        preprocessor: Preprocessor,
        thresholds: Thresholds,
        sinks: Sequence[Sink] = (),
        *,
        max_frames: int | None = None,
        backoff: Backoff | None = None,
        max_reconnects: int | None = None,
        min_region_area: int = 1,
        max_regions: int = 32,
        notifier: SystemdNotifier | None = None,
        watchdog: WatchdogFeeder | None = None,
        source_factory: Callable[[], Any] | None = None,
        model_info: dict | None = None,
        status_interval_s: float = 5.0,
        trigger=None,
    ):
        self.spec = source
        self.backend = backend
        self.preprocessor = preprocessor
        self.thresholds = thresholds
        self.sinks = list(sinks)
        self.max_frames = max_frames
        self.min_region_area = min_region_area
        self.max_regions = max_regions
        self.notifier = notifier or SystemdNotifier(address="")
        self.watchdog = watchdog
        self.model_info = dict(model_info or {})
        self.status_interval_s = status_interval_s
        self.trigger = trigger   # a TriggerGate: one frame per PLC trigger
        self.stop_event = threading.Event()
        self.stopped_by_signal = False
        live = source.live
        if max_reconnects is None and not live:
            max_reconnects = 0  # a missing video file or folder is an error, not something to wait for
        self.source = ReconnectingSource(
            source_factory or (lambda: make_source(source)),
            live=live,
            description=source.describe(),
            backoff=backoff,
            max_attempts=max_reconnects,
            stop=self.stop_event,
            on_event=self._source_event,
        )
        self.slot = LatestSlot() if live else QueueSlot(maxsize=4, stop=self.stop_event)
        self.window = LatencyWindow()
        self.frames_processed = 0
        self.ng_count = 0
        self.review_count = 0
        self.inference_errors = 0
        self.sink_errors = 0
        self.sink_failures: dict[str, int] = collections.Counter()
        self.started_wall: float | None = None
        self.started: float | None = None
        self.last_result_time: float | None = None
        self.last_result: FrameResult | None = None
        # Bounded in items, and each item holds a frame and a map: 32 keeps a 1080p backlog under
        # ~250 MB while absorbing an fsync burst. When full, inference waits (files: nothing lost;
        # live sources: the grabber drops and counts frames instead).
        self._out: queue.Queue = queue.Queue(maxsize=32)
        self.output_queue_max = 0
        self._grabber: FrameGrabber | None = None
        self._output_thread: threading.Thread | None = None
        self._last_sink_warning: dict[str, float] = {}

    # ------------------------------------------------------------------ control

    def stop(self, by_signal: bool = False) -> None:
        """Thread- and signal-safe: stop capturing; run() finishes in-flight frames and returns."""
        if by_signal:
            self.stopped_by_signal = True
        self.stop_event.set()

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """New thresholds from the next frame on (the operator page's recorded change): the
        pipeline's and every output's that draws or decides with them."""
        self.thresholds = thresholds
        for sink in self.sinks:
            if hasattr(sink, "set_thresholds"):
                sink.set_thresholds(thresholds)
            elif hasattr(sink, "thresholds"):
                sink.thresholds = thresholds
        self._emit(lifecycle_event("thresholds", image_threshold=thresholds.image,
                                   pixel_threshold=thresholds.pixel,
                                   review_threshold=thresholds.review))

    def _prepare(self, frame: Frame) -> np.ndarray:
        return self.preprocessor(frame.image, frame.color, frame.name or f"frame {frame.index}")

    def _source_event(self, kind: str, **fields: Any) -> None:
        record = lifecycle_event(f"source_{kind}", source=self.spec.describe(), **fields)
        self._emit(record)
        if kind in ("lost", "open_failed"):
            self.notifier.status(f"{self.spec.describe()}: {kind.replace('_', ' ')}: {fields.get('error', '')}; reconnecting")

    def _on_bad_frame(self, exc: FrameError, frame: Frame | None) -> None:
        n = self.source.counters.frames_bad
        # Log the first few and then every 100th: a camera delivering garbage must not flood the log.
        if n <= 5 or n % 100 == 0:
            log.warning("bad frame (%d so far): %s", n, exc)
            self._emit(lifecycle_event("bad_frame", error=str(exc), count=n,
                                       **({"frame": frame.index} if frame else {})))

    def _emit(self, item: Any) -> None:
        self._out.put(item)
        depth = self._out.qsize()
        if depth > self.output_queue_max:
            self.output_queue_max = depth

    # ------------------------------------------------------------------ run

    def run(self) -> RunSummary:
        self.started_wall = time.time()
        self.started = time.monotonic()
        self._output_thread = threading.Thread(target=self._output_loop, name="edgestad-output", daemon=True)
        self._output_thread.start()
        self._emit(lifecycle_event("start", source=self.spec.describe(), backend=self.backend.name,
                                   precision=getattr(self.backend, "precision", ""), **self.model_info,
                                   image_threshold=self.thresholds.image, pixel_threshold=self.thresholds.pixel,
                                   **({"review_threshold": self.thresholds.review}
                                      if self.thresholds.review is not None else {})))
        self.notifier.ready(f"started: {self.spec.describe()} on {self.backend.name}")
        if self.watchdog is not None:
            self.watchdog.start()
        self._grabber = FrameGrabber(self.source, self._prepare, self.slot, self.stop_event,
                                     on_bad=self._on_bad_frame, max_frames=self.max_frames,
                                     gate=self.trigger, on_idle=self._idle)
        self._grabber.start()
        fatal: BaseException | None = None
        try:
            self._inference_loop()
        except BaseException as exc:  # noqa: BLE001 - still flush the sinks, then re-raise
            fatal = exc
            self.stop_event.set()
        self._grabber.join(timeout=5.0)
        if self._grabber.is_alive():
            log.warning("capture thread did not stop within 5 s (source read blocked); leaving it")
        if fatal is None and isinstance(self._grabber.error, BaseException):
            fatal = self._grabber.error
        summary = self.summary()
        self._emit(lifecycle_event("stop", reason=self._stop_reason(fatal), **summary.to_dict()))
        self._out.put(None)
        self._output_thread.join(timeout=30.0)
        self.notifier.stopping(f"stopped: {summary.frames_processed} frames, {summary.ng_count} NG")
        if self.watchdog is not None:
            self.watchdog.stop()
        if fatal is not None:
            raise fatal
        return summary

    def _idle(self) -> None:
        """Waiting for a trigger: alive (the watchdog keeps being fed), not stuck."""
        if self.watchdog is not None:
            self.watchdog.frame_done()

    def _stop_reason(self, fatal: BaseException | None) -> str:
        if fatal is not None:
            return f"error: {fatal}"
        if self.stopped_by_signal:
            return "signal"
        if self.max_frames is not None and self._grabber is not None and self._grabber.captured >= self.max_frames:
            return "max_frames"
        return "end_of_source"

    def _inference_loop(self) -> None:
        consecutive_errors = 0
        next_status = time.monotonic() + self.status_interval_s
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if now >= next_status:
                self.notifier.status(self.status_line())
                next_status = now + self.status_interval_s
            if self.stop_event.is_set() and stop_deadline is None:
                stop_deadline = now + 5.0  # a capture read blocked on a dead stream must not hang shutdown
            try:
                item = self.slot.get(timeout=0.2)
            except queue.Empty:
                if self._grabber is not None and not self._grabber.is_alive():
                    try:  # anything it queued just before it ended
                        item = self.slot.get(timeout=0)
                    except queue.Empty:
                        return
                elif stop_deadline is not None and time.monotonic() > stop_deadline:
                    return
                else:
                    continue
            if is_end(item):
                return
            try:
                result = self._infer(item)
            except (BackendError, Exception) as exc:  # noqa: BLE001 - counted; fatal if it persists
                consecutive_errors += 1
                self.inference_errors += 1
                log.error("inference failed on frame %d: %s", item.frame.index, exc)
                self._emit(lifecycle_event("inference_error", frame=item.frame.index, error=str(exc)))
                if consecutive_errors >= MAX_CONSECUTIVE_INFERENCE_ERRORS:
                    raise InferenceFailure(
                        f"{consecutive_errors} consecutive inference failures on {self.backend.name}; last: {exc}"
                    ) from None
                continue
            consecutive_errors = 0
            if self.watchdog is not None:
                self.watchdog.frame_done()
            self._emit(result)

    def _infer(self, item: Captured) -> FrameResult:
        frame = item.frame
        t0 = time.monotonic()
        roi = self.preprocessor.spec.roi
        seen_hw = frame.image.shape[:2] if roi is None else (roi[3], roi[2])
        box = self.preprocessor.valid_box(seen_hw)
        maps, scores = self.backend.infer(item.tensor[None], None if box is None else box[None])
        t1 = time.monotonic()
        amap = maps[0]
        if box is not None:   # letterbox: the map of the image itself, without the padding
            top, left, bottom, right = (int(v) for v in box)
            amap = amap[top:bottom, left:right]
        score = float(scores[0])
        h, w = frame.image.shape[:2]
        regions, total = find_regions(amap, self.thresholds.pixel, (seen_hw[1], seen_hw[0]),
                                      self.min_region_area, self.max_regions)
        if roi is not None:   # region boxes in frame pixels
            regions = [Region(r.area, (r.bbox[0] + roi[0], r.bbox[1] + roi[1], *r.bbox[2:]),
                              r.max_score) for r in regions]
        decision = self.thresholds.decide(score)
        is_ng = decision == "ng"
        result = FrameResult(
            index=frame.index, name=frame.name, capture_time=frame.capture_time,
            capture_monotonic=frame.capture_monotonic, inference_start=t0, inference_end=t1,
            result_time=time.time(), score=score, is_ng=is_ng, regions=regions, regions_total=total,
            anomaly_map=amap, frame=frame.image, frame_color=frame.color, frame_size=(w, h),
            is_review=decision == "review", roi=None if roi is None else tuple(roi),
        )
        self.frames_processed += 1
        self.ng_count += int(is_ng)
        self.review_count += int(decision == "review")
        self.window.add(result.latency_ms, result.inference_ms, t1)
        self.last_result_time = t1
        self.last_result = result
        return result

    # ------------------------------------------------------------------ outputs

    def _output_loop(self) -> None:
        while True:
            item = self._out.get()
            if item is None:
                break
            for sink in self.sinks:
                try:
                    if isinstance(item, FrameResult):
                        sink.handle(item)
                    else:
                        sink.event(item)
                except Exception as exc:  # noqa: BLE001 - a broken sink must not stop inspection
                    self.sink_errors += 1
                    self.sink_failures[sink.name] += 1
                    now = time.monotonic()
                    if now - self._last_sink_warning.get(sink.name, -1e9) > 60:
                        log.error("output %s failed: %s (%d failures)", sink.name, exc, self.sink_failures[sink.name])
                        self._last_sink_warning[sink.name] = now
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                self.sink_errors += 1
                log.error("closing output %s failed: %s", sink.name, exc)

    # ------------------------------------------------------------------ status

    @property
    def frames_dropped(self) -> int:
        return self.slot.dropped

    def summary(self) -> RunSummary:
        elapsed = (time.monotonic() - self.started) if self.started else 0.0
        c = self.source.counters
        return RunSummary(
            source=self.spec.describe(),
            backend=self.backend.name,
            frames_captured=self._grabber.captured if self._grabber else 0,
            frames_processed=self.frames_processed,
            frames_dropped=self.frames_dropped,
            frames_bad=c.frames_bad,
            ng_count=self.ng_count,
            reconnects=c.reconnects,
            source_losses=c.losses,
            inference_errors=self.inference_errors,
            sink_errors=self.sink_errors,
            elapsed_s=round(elapsed, 3),
            fps=round(self.frames_processed / elapsed, 3) if elapsed > 0 else 0.0,
            stopped_by_signal=self.stopped_by_signal,
            review_count=self.review_count,
        )

    def snapshot(self) -> dict:
        """Everything /status and /metrics report (JSON-serialisable)."""
        s = self.summary().to_dict()
        lat = self.window.percentiles("latency", (0.5, 0.9, 0.95, 0.99))
        inf = self.window.percentiles("inference")
        now = time.monotonic()
        last = self.last_result
        s.update(
            {
                "precision": getattr(self.backend, "precision", ""),
                "model_sha256": getattr(self.backend, "model_sha256", ""),
                "model_file": str(getattr(self.backend, "model_file", "")),
                **{k: v for k, v in self.model_info.items() if k not in s},
                "fps_recent": round(self.window.fps(now), 3),
                "latency_ms": {f"p{int(q * 100)}": v for q, v in lat.items()},
                "inference_ms": {f"p{int(q * 100)}": v for q, v in inf.items()},
                "source_connected": self.source.counters.connected,
                "source_open_failures": self.source.counters.open_failures,
                "source_last_error": self.source.counters.last_error,
                "last_result_age_s": round(now - self.last_result_time, 3) if self.last_result_time else None,
                "started": self.started_wall,
                "thresholds": {"image": self.thresholds.image, "pixel": self.thresholds.pixel,
                               "review": self.thresholds.review},
                "last_result": last.to_event() if last is not None else None,
                "sink_failures": dict(self.sink_failures),
                "output_queue": self._out.qsize(),
                "output_queue_max": self.output_queue_max,
                "running": not self.stop_event.is_set(),
            }
        )
        return s

    def status_line(self) -> str:
        lat = self.window.percentiles("latency", (0.5,))[0.5]
        lat_txt = f"{lat:.1f} ms" if lat is not None else "-"
        return (
            f"{self.spec.describe()}: {self.window.fps():.1f} fps, p50 {lat_txt}, "
            f"{self.frames_processed} frames, {self.ng_count} NG, {self.frames_dropped} dropped, "
            f"{self.source.counters.reconnects} reconnects"
        )
