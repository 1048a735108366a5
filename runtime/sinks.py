"""Where results go: events log, NG frame store, webhook, MQTT, display window.

Every sink has ``handle(result)`` for frame results, ``event(record)`` for lifecycle events
(start, reconnect, bad frame, stop) and ``close()``. The pipeline calls them from one output
thread, never from the inference thread, so a slow disk or network never slows inference; a sink
that raises is counted and logged, and the line keeps running.
"""

from __future__ import annotations

import collections
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

from edgestad.files import atomic_write_bytes, atomic_write_json, fsync_dir

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
        if result.flagged or self.all_frames:
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
        if not result.flagged:
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

    def __init__(self, name: str, send: Callable[[dict], Any], queue_size: int = 256):
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
        if result.flagged:
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
                if self._send(record) is not False:  # False: the send function dropped it (and counted it)
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


class MemoryOutbox:
    """Bounded FIFO of undelivered records in memory (lost when the process ends)."""

    def __init__(self, max_items: int):
        self.max_items = int(max_items)
        self._items: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, record: dict) -> int:
        """Add a record; returns how many old records were dropped to stay within the bound."""
        dropped = 0
        while len(self._items) >= self.max_items:
            self._items.popitem(last=False)
            dropped += 1
        self._items[self._next] = record
        self._next += 1
        return dropped

    def oldest(self) -> tuple[Any, dict] | None:
        for key, record in self._items.items():
            return key, record
        return None

    def remove(self, key: Any) -> None:
        self._items.pop(key, None)


class DirOutbox:
    """Bounded FIFO of undelivered records on disk: one JSON file per record in ``folder``.

    Each file is written atomically (temp file, fsync, rename, directory fsync) before ``put``
    returns and removed only after the record was delivered, so a crash, a power cut or a restart
    of the runtime loses nothing: a new outbox on the same folder resumes with the oldest record.
    Names sort in arrival order (``<time_ns>-<seq>.json``).
    """

    _NAME = re.compile(r"^\d{20}-\d{9}\.json$")

    def __init__(self, folder: str | os.PathLike, max_items: int):
        self.folder = Path(folder)
        self.max_items = int(max_items)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            names = sorted(p.name for p in self.folder.iterdir() if self._NAME.match(p.name))
        except OSError as exc:
            raise OutputError(f"cannot use webhook outbox {self.folder}: {exc}") from None
        self._names: collections.deque[str] = collections.deque(names)
        self._seq = 0

    def __len__(self) -> int:
        return len(self._names)

    def put(self, record: dict) -> int:
        dropped = 0
        while len(self._names) >= self.max_items:
            self.remove(self._names[0])
            dropped += 1
        self._seq = (self._seq + 1) % 10**9
        name = f"{time.time_ns():020d}-{self._seq:09d}.json"
        data = json.dumps(record, separators=(",", ":"), default=_json_default).encode("utf-8")
        atomic_write_bytes(self.folder / name, data)
        self._names.append(name)
        return dropped

    def oldest(self) -> tuple[Any, dict] | None:
        while self._names:
            name = self._names[0]
            try:
                return name, json.loads((self.folder / name).read_text(encoding="utf-8"))
            except FileNotFoundError:
                self._names.popleft()
            except (OSError, ValueError) as exc:  # a file damaged outside the runtime: set it aside
                log.error("webhook outbox: skipping unreadable %s (%s)", name, exc)
                self._names.popleft()
                try:
                    os.replace(self.folder / name, self.folder / f"{name}.bad")
                except OSError:
                    pass
        return None

    def remove(self, key: Any) -> None:
        try:
            os.unlink(self.folder / key)
        except FileNotFoundError:
            pass
        try:
            self._names.remove(key)
        except ValueError:
            pass


class WebhookSink(Sink):
    """POSTs each NG event as JSON to ``url``: at least once, retried with exponential backoff.

    Events go into a bounded outbox first (``outbox_dir``: one file per event, fsync'd, survives a
    restart of the runtime; without it, memory only) and a sender thread delivers them oldest
    first. An event leaves the outbox only after the server answered 2xx; a failed attempt
    (connection refused or dropped, timeout, 5xx, 408, 429) is retried after ``backoff_initial``
    s, doubling up to ``backoff_max`` s, and a success resets the delay. Other 4xx answers mean the
    server will never take that event: it is dropped and counted (``rejected``). When the outbox
    holds ``max_outbox`` events the oldest is dropped (counted in ``dropped``, logged). ``close``
    keeps delivering for up to ``timeout`` s; what is still undelivered stays in the outbox folder
    for the next start. Duplicates are possible (a 2xx lost on the way back), so the receiver
    should de-duplicate on ``frame`` + ``time`` if it cares.
    """

    name = "webhook"

    def __init__(self, url: str, timeout_s: float = 5.0, outbox_dir: str | os.PathLike | None = None,
                 max_outbox: int = 10000, backoff_initial: float = 0.5, backoff_max: float = 30.0):
        if not re.match(r"^https?://", url):
            raise OutputError(f"--webhook must be an http:// or https:// URL, got {url!r}")
        self.url = url
        self.timeout_s = timeout_s
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.outbox = DirOutbox(outbox_dir, max_outbox) if outbox_dir else MemoryOutbox(max_outbox)
        self.sent = 0
        self.failed = 0  # failed attempts (each is retried)
        self.rejected = 0  # events a 4xx answer refused for good
        self.dropped = 0  # events pushed out of a full outbox
        self.delay = 0.0  # the current retry delay (0 after a success)
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")
        self._last_warning = 0.0
        if len(self.outbox):
            log.info("webhook: %d undelivered event(s) from a previous run in the outbox", len(self.outbox))
        self._thread = threading.Thread(target=self._loop, name="edgestad-webhook", daemon=True)
        self._thread.start()

    def handle(self, result: FrameResult) -> None:
        if result.flagged:
            self.offer(result.to_event())

    def offer(self, record: dict) -> None:
        with self._cond:
            dropped = self.outbox.put(record)
            self._cond.notify_all()
        if dropped:
            self.dropped += dropped
            log.warning("webhook outbox full (%d): dropped the %d oldest event(s); %d dropped so far",
                        self.outbox.max_items, dropped, self.dropped)

    @property
    def pending(self) -> int:
        return len(self.outbox)

    def _post(self, record: dict) -> None:
        body = json.dumps(record, default=_json_default).encode("utf-8")
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "edgestad"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            resp.read()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing and (not len(self.outbox) or time.monotonic() >= self._deadline):
                        return
                    item = self.outbox.oldest()
                    if item is not None:
                        break
                    self._cond.wait()
            key, record = item
            try:
                self._post(record)
            except urllib.error.HTTPError as exc:
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    with self._cond:
                        self.outbox.remove(key)
                    self.rejected += 1
                    log.error("webhook: %s refused an event with HTTP %d; dropped it (%d so far)",
                              self.url, exc.code, self.rejected)
                    continue
                self._retry_later(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - network errors of every kind are retried
                self._retry_later(exc)
                continue
            with self._cond:
                self.outbox.remove(key)
            self.sent += 1
            self.delay = 0.0

    def _retry_later(self, exc: BaseException) -> None:
        self.failed += 1
        self.delay = self.backoff_initial if self.delay <= 0 else min(self.backoff_max, self.delay * 2)
        now = time.monotonic()
        if now - self._last_warning > 60:
            log.warning("webhook: sending to %s failed (%s); retrying in %.1f s, %d event(s) waiting",
                        self.url, exc, self.delay, len(self.outbox))
            self._last_warning = now
        end = now + self.delay
        with self._cond:  # close() shortens the wait to its deadline
            while (left := min(end, self._deadline) - time.monotonic()) > 0:
                self._cond.wait(left)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver for up to ``timeout`` s more, then stop; undelivered events stay in the outbox."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout=timeout + self.timeout_s + 1)
        if len(self.outbox):
            where = f"kept in {self.outbox.folder}" if isinstance(self.outbox, DirOutbox) else "lost (no outbox folder)"
            log.warning("webhook: %d undelivered event(s) %s", len(self.outbox), where)


def parse_mqtt(spec: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"(?:mqtt://)?([^:/]+)(?::(\d+))?/(.+)", spec.strip())
    if not m:
        raise OutputError(f"--mqtt expects HOST[:PORT]/TOPIC such as broker.local:1883/line1/ng, got {spec!r}")
    return m.group(1), int(m.group(2) or 1883), m.group(3)


# A full MQTT queue while connected waits this long for PUBACKs to make room (and gives up sooner
# when none arrives for FULL_QUEUE_STALL_S) before the message is dropped.
FULL_QUEUE_GRACE_S = 5.0
FULL_QUEUE_STALL_S = 1.0


class MqttSink(_BackgroundSender):
    """Publishes NG events to an MQTT topic, QoS 1, with paho-mqtt (only if it is installed).

    While the broker is unreachable, paho-mqtt keeps reconnecting (``reconnect_min`` s, doubling
    up to ``reconnect_max`` s) and holds up to ``queue_size`` messages that the broker has not
    acknowledged yet; they are sent, in order, once it is back. A message published while that
    queue is full is dropped and counted (``dropped``, logged) - unless the client is connected
    and acknowledgements are arriving (the backlog draining after a reconnect): then it waits for
    room (``FULL_QUEUE_GRACE_S``) rather than drop a message the broker could take. Nothing below the bound is lost
    while the runtime keeps running (at least once: a message whose PUBACK was lost is sent again).
    The queue is in memory: what is unacknowledged when the runtime stops is lost (``close``
    waits up to its timeout for acknowledgements first).
    """

    def __init__(self, spec: str, queue_size: int = 1000, reconnect_min: float = 1.0, reconnect_max: float = 30.0):
        host, port, topic = parse_mqtt(spec)
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise OutputError("--mqtt needs the paho-mqtt package (pip install paho-mqtt)") from None
        if queue_size < 1:
            raise OutputError(f"MQTT queue size must be >= 1, got {queue_size}")
        client_id = f"edgestad-{os.urandom(4).hex()}"  # unique: two runtimes on one broker must not evict each other
        try:  # paho-mqtt >= 2 wants the callback API version; 1.x has no such argument
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        except AttributeError:
            client = mqtt.Client(client_id=client_id)
        client.max_queued_messages_set(int(queue_size))
        client.reconnect_delay_set(reconnect_min, reconnect_max)
        client.connect_async(host, port)
        client.loop_start()
        self.client, self.topic, self.queue_size = client, topic, int(queue_size)
        self.handed = 0  # messages accepted by the client (sent, or queued while disconnected)
        self.acked = 0  # PUBACKs received from the broker

        def on_publish(*args) -> None:  # (client, userdata, mid[, reason_code, properties])
            self.acked += 1

        client.on_publish = on_publish
        ok_codes = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)  # NO_CONN: queued until reconnected
        full_code = mqtt.MQTT_ERR_QUEUE_SIZE

        def publish(record: dict) -> bool:
            payload = json.dumps(record, default=_json_default)
            info = client.publish(topic, payload, qos=1)
            if info.rc == full_code and client.is_connected():
                # Connected, yet full: the queue holds messages already (re)sent whose PUBACKs are
                # on their way, e.g. the backlog resent right after a reconnect. While they keep
                # arriving, wait for room instead of dropping a message the broker could take.
                # (This runs on the sender's own thread; frames are not held up.)
                now = time.monotonic()
                deadline, seen, progress = now + FULL_QUEUE_GRACE_S, self.acked, now
                while (info.rc == full_code and client.is_connected() and now < deadline
                       and now - progress < FULL_QUEUE_STALL_S):
                    time.sleep(0.01)
                    info = client.publish(topic, payload, qos=1)
                    now = time.monotonic()
                    if self.acked != seen:
                        seen, progress = self.acked, now
            if info.rc == full_code:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning("mqtt: %d messages wait for %s:%d already (queue_size); dropped %d so far",
                                self.queue_size, host, port, self.dropped)
                return False
            if info.rc not in ok_codes:
                raise OSError(f"MQTT publish to {host}:{port}/{topic} failed (rc={info.rc})")
            self.handed += 1
            return True

        super().__init__("mqtt", publish, queue_size=max(256, int(queue_size)))

    @property
    def unacked(self) -> int:
        """Messages handed to the client that the broker has not acknowledged yet."""
        return max(0, self.handed - self.acked)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        deadline = time.monotonic() + timeout
        while self.unacked and self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.unacked:
            log.warning("mqtt: %d message(s) not acknowledged by the broker at close; lost", self.unacked)
        self.client.disconnect()
        self.client.loop_stop()


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
