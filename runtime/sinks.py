"""Where results go: events log, NG frame store, webhook, MQTT, display window.

Every sink has ``handle(result)`` for frame results, ``event(record)`` for lifecycle events
(start, reconnect, bad frame, stop) and ``close()``. The pipeline calls them from one output
thread, never from the inference thread, so a slow disk or network never slows inference; a sink
that raises is counted and logged, and the line keeps running.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from edgestad.bundle import atomic_write_bytes, atomic_write_json, fsync_dir

from .errors import OutputError
from .results import FrameResult, Thresholds, iso_time, render_overlay

log = logging.getLogger("edgestad.runtime.sinks")


class Sink:
    name = "sink"

    def handle(self, result: FrameResult) -> None:
        pass

    def event(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- events log


class EventLog(Sink):
    """JSON lines in ``<dir>/events.jsonl``, fsync'd after every line, rotated by size.

    Each line is flushed and fsync'd before ``handle``/``event`` returns, so a crash or power cut
    loses nothing that was written. Rotation: events.jsonl -> events.1.jsonl -> ... ->
    events.<backups>.jsonl (the oldest is deleted); the directory is fsync'd after each rename.
    By default only NG results and lifecycle events are written (``all_frames`` adds OK frames).
    """

    name = "events"
    FILE = "events.jsonl"

    def __init__(self, folder: str | os.PathLike, max_bytes: int = 10 << 20, backups: int = 5,
                 all_frames: bool = False):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.all_frames = all_frames
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError as exc:
            raise OutputError(f"cannot write events to {self.folder}: {exc}") from None
        self.lines = 0
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.folder / self.FILE

    def _open(self) -> None:
        existed = self.path.exists()
        self._fh = open(self.path, "a", encoding="utf-8")
        self._size = self._fh.tell()
        if not existed:
            fsync_dir(self.folder)  # the new file's directory entry must survive a crash too

    def _rotate(self) -> None:
        self._fh.close()
        if self.backups <= 0:
            os.unlink(self.path)
        else:
            oldest = self.folder / f"events.{self.backups}.jsonl"
            if oldest.exists():
                oldest.unlink()
            for i in range(self.backups - 1, 0, -1):
                src = self.folder / f"events.{i}.jsonl"
                if src.exists():
                    os.replace(src, self.folder / f"events.{i + 1}.jsonl")
            os.replace(self.path, self.folder / "events.1.jsonl")
        fsync_dir(self.folder)
        self._open()

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), default=_json_default) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            if self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._size += len(data)
            self.lines += 1

    def handle(self, result: FrameResult) -> None:
        if result.is_ng or self.all_frames:
            self.write(result.to_event())

    def event(self, record: dict) -> None:
        self.write(record)

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# --------------------------------------------------------------------------- NG frame store


@dataclass
class _Saved:
    stem: str
    mtime: float
    size: int


class NgSaver(Sink):
    """Saves each NG frame as ``<stem>_frame.jpg``, ``<stem>_map.npy`` (float32, model resolution),
    ``<stem>_overlay.jpg`` and ``<stem>.json`` (the event), each written atomically (temp file,
    fsync, rename). The JSON is written last: its presence marks a complete set.

    Capped by total size (``max_bytes``) and age (``max_age_s``): after each save the oldest sets
    are deleted until both hold, so a line with a bad batch cannot fill the disk.
    """

    name = "save_ng"
    _STEM = re.compile(r"^(\d{8}T\d{6}\.\d{3}Z_\d{8})(?:_frame\.jpg|_map\.npy|_overlay\.jpg|\.json)$")

    def __init__(self, folder: str | os.PathLike, thresholds: Thresholds, max_bytes: int = 1 << 30,
                 max_age_s: float = 30 * 86400, jpeg_quality: int = 95):
        self.folder = Path(folder)
        self.thresholds = thresholds
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self.jpeg_quality = int(jpeg_quality)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write NG frames to {self.folder}: {exc}") from None
        self.saved = 0
        self.deleted = 0
        self._sets: dict[str, _Saved] = {}
        self._scan()
        self._enforce_caps()

    def _scan(self) -> None:
        for p in self.folder.iterdir():
            m = self._STEM.match(p.name)
            if not m:
                continue
            st = p.stat()
            entry = self._sets.setdefault(m.group(1), _Saved(m.group(1), st.st_mtime, 0))
            entry.size += st.st_size
            entry.mtime = min(entry.mtime, st.st_mtime)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._sets.values())

    def handle(self, result: FrameResult) -> None:
        if not result.is_ng:
            return
        t = time.gmtime(result.capture_time)
        millis = int((result.capture_time % 1) * 1000)
        stem = f"{time.strftime('%Y%m%dT%H%M%S', t)}.{millis:03d}Z_{result.index % 10**8:08d}"
        size = 0
        frame = result.frame_bgr()
        if frame is not None:
            size += self._write(f"{stem}_frame.jpg", _encode_jpeg(frame, self.jpeg_quality))
        size += self._write(f"{stem}_map.npy", _npy_bytes(result.anomaly_map))
        size += self._write(f"{stem}_overlay.jpg", _encode_jpeg(render_overlay(result, self.thresholds), 90))
        record = result.to_event()
        record["files"] = [f"{stem}_frame.jpg", f"{stem}_map.npy", f"{stem}_overlay.jpg"]
        path = atomic_write_json(self.folder / f"{stem}.json", record)
        size += path.stat().st_size
        self._sets[stem] = _Saved(stem, time.time(), size)
        self.saved += 1
        self._enforce_caps()

    def _write(self, name: str, data: bytes) -> int:
        atomic_write_bytes(self.folder / name, data)
        return len(data)

    def _enforce_caps(self) -> None:
        now = time.time()
        ordered = sorted(self._sets.values(), key=lambda s: (s.mtime, s.stem))
        total = sum(s.size for s in ordered)
        for s in ordered:
            too_old = now - s.mtime > self.max_age_s
            too_big = total > self.max_bytes
            if not (too_old or too_big):
                break
            self._delete(s.stem)
            total -= s.size

    def _delete(self, stem: str) -> None:
        # JSON first: a set without its JSON is an incomplete set, never a misleading one.
        for suffix in (".json", "_frame.jpg", "_map.npy", "_overlay.jpg"):
            try:
                os.unlink(self.folder / f"{stem}{suffix}")
            except FileNotFoundError:
                pass
        self._sets.pop(stem, None)
        self.deleted += 1


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OutputError("JPEG encoding failed")
    return buf.tobytes()


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    bio = io.BytesIO()
    np.save(bio, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return bio.getvalue()


# --------------------------------------------------------------------------- webhook and MQTT


class _BackgroundSender(Sink):
    """Sends NG events from its own thread through a bounded queue: a dead server or a slow network
    costs neither inference nor the events log. Messages that do not fit are counted as dropped."""

    def __init__(self, name: str, send: Callable[[dict], None], queue_size: int = 256):
        self.name = name
        self._send = send
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"edgestad-{name}", daemon=True)
        self._thread.start()

    def handle(self, result: FrameResult) -> None:
        if result.is_ng:
            self._offer(result.to_event())

    def _offer(self, record: dict) -> None:
        try:
            self._q.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _loop(self) -> None:
        while True:
            record = self._q.get()
            if record is None:
                return
            try:
                self._send(record)
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 - any failure is counted, the line keeps running
                self.failed += 1
                now = time.monotonic()
                if now - self._last_warning > 60:
                    log.warning("%s: sending failed (%s); %d failed so far", self.name, exc, self.failed)
                    self._last_warning = now

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout)


class WebhookSink(_BackgroundSender):
    """POSTs each NG event as JSON to ``url`` (stdlib urllib, timeout ``timeout_s``)."""

    def __init__(self, url: str, timeout_s: float = 5.0):
        if not re.match(r"^https?://", url):
            raise OutputError(f"--webhook must be an http:// or https:// URL, got {url!r}")
        self.url = url
        self.timeout_s = timeout_s
        super().__init__("webhook", self._post)

    def _post(self, record: dict) -> None:
        body = json.dumps(record, default=_json_default).encode("utf-8")
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "edgestad"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            resp.read()


def parse_mqtt(spec: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"(?:mqtt://)?([^:/]+)(?::(\d+))?/(.+)", spec.strip())
    if not m:
        raise OutputError(f"--mqtt expects HOST[:PORT]/TOPIC such as broker.local:1883/line1/ng, got {spec!r}")
    return m.group(1), int(m.group(2) or 1883), m.group(3)


class MqttSink(_BackgroundSender):
    """Publishes NG events to an MQTT topic with paho-mqtt (only if it is installed)."""

    def __init__(self, spec: str):
        host, port, topic = parse_mqtt(spec)
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise OutputError("--mqtt needs the paho-mqtt package (pip install paho-mqtt)") from None
        try:  # paho-mqtt >= 2 wants the callback API version; 1.x has no such argument
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgestad")
        except AttributeError:
            client = mqtt.Client(client_id="edgestad")
        client.connect_async(host, port)
        client.loop_start()
        self.client, self.topic = client, topic

        def publish(record: dict) -> None:
            info = client.publish(topic, json.dumps(record, default=_json_default), qos=1)
            if info.rc != 0:
                raise OSError(f"MQTT publish to {host}:{port}/{topic} failed (rc={info.rc})")

        super().__init__("mqtt", publish)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        self.client.loop_stop()
        self.client.disconnect()


# --------------------------------------------------------------------------- window


class DisplaySink(Sink):
    """An OpenCV window with the overlay; ``q`` or Esc stops the run."""

    name = "display"

    def __init__(self, thresholds: Thresholds, on_quit: Callable[[], None], title: str = "edgestad"):
        self.thresholds = thresholds
        self.on_quit = on_quit
        self.title = title
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            raise OutputError(
                "--display needs an OpenCV build with GUI support (opencv-python, not "
                "opencv-python-headless; JetPack's OpenCV has it) and a display; OpenCV says: "
                + _first_line(getattr(exc, "err", "") or str(exc))
            ) from None

    def handle(self, result: FrameResult) -> None:
        cv2.imshow(self.title, render_overlay(result, self.thresholds))
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self.on_quit()

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
        except cv2.error:
            pass


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0][:200] if str(text).strip() else "error"


class CallbackSink(Sink):
    """Calls a function with each result (library use and tests)."""

    name = "callback"

    def __init__(self, fn: Callable[[FrameResult], None], on_event: Callable[[dict], None] | None = None):
        self.fn = fn
        self.on_event = on_event

    def handle(self, result: FrameResult) -> None:
        self.fn(result)

    def event(self, record: dict) -> None:
        if self.on_event:
            self.on_event(record)


def lifecycle_event(kind: str, **fields: Any) -> dict:
    return {"event": kind, "time": iso_time(), **fields}
