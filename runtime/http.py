"""HTTP outputs: ``/`` page, ``/stream.mjpg`` overlay stream, ``/status`` JSON, ``/metrics``.

Standard library only (``ThreadingHTTPServer``); ``/metrics`` is rendered by prometheus_client
when it is installed and by a small writer of the same text format otherwise. The server binds
127.0.0.1 unless told otherwise: the stream shows production parts, and the status page is not
meant for the plant network without a reverse proxy in front.

Overlays are JPEG-encoded lazily: only while a client watches, at most ``max_fps`` per second,
once per frame whatever the number of clients. Without viewers the stream costs nothing.

Limits, so that a misbehaving client or a burst on a plant network cannot exhaust the runtime:

- ``read_timeout_s`` (default 30 s, ``http_read_timeout``): a connection that sends nothing for that
  long (an idle keep-alive, a half-sent request) is closed and its thread ends. The same timeout
  bounds each socket write, so a stream viewer that stops reading is dropped too.
- ``max_clients`` (default 32, ``http_max_clients``): connections served at once (one thread
  each, MJPEG viewers included). Beyond that a connection is answered ``503 Service Unavailable``
  with ``Retry-After`` by one small rejector thread and closed, instead of starting a thread.
- ``backlog`` (128): the listen queue, so a burst of connects waits for ``accept`` instead of
  being refused by the kernel.
- ``HEAD`` is answered for every path (headers only).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import cv2

from .errors import OutputError
from .results import FrameResult, Thresholds, render_overlay
from .sinks import Sink

log = logging.getLogger("edgestad.runtime.http")

BOUNDARY = "edgestadframe"


class OverlayFeed(Sink):
    """Keeps the latest result; encodes its overlay as JPEG on demand (cached per frame)."""

    name = "http_stream"

    def __init__(self, thresholds: Thresholds, max_fps: float = 15.0, jpeg_quality: int = 80):
        self.thresholds = thresholds
        self.min_interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self.jpeg_quality = jpeg_quality
        self._cond = threading.Condition()
        self._result: FrameResult | None = None
        self._seq = 0
        self._jpeg: tuple[int, bytes] | None = None
        self.closed = False

    def handle(self, result: FrameResult) -> None:
        with self._cond:
            self._result = result
            self._seq += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_jpeg(self, after_seq: int, timeout: float) -> tuple[int, bytes] | None:
        """The overlay JPEG of the first frame newer than ``after_seq``, or None on timeout/close."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._seq > after_seq or self.closed, timeout):
                return None
            if self._result is None:
                return None
            seq, result = self._seq, self._result
            if self._jpeg is not None and self._jpeg[0] == seq:
                return self._jpeg
        ok, buf = cv2.imencode(".jpg", render_overlay(result, self.thresholds),
                               [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            return None
        with self._cond:
            self._jpeg = (seq, buf.tobytes())
            return self._jpeg


# --------------------------------------------------------------------------- metrics


def metric_families(snap: dict) -> list[tuple[str, str, str, list[tuple[dict, float]]]]:
    """(name, type, help, [(labels, value)]) for one status snapshot."""

    def num(v: Any) -> float:
        return float("nan") if v is None else float(v)

    fams = [
        ("edgestad_frames_processed", "counter", "Frames inferred", [({}, snap["frames_processed"])]),
        ("edgestad_frames_captured", "counter", "Frames read and preprocessed", [({}, snap["frames_captured"])]),
        ("edgestad_frames_dropped", "counter", "Frames dropped by the latest-frame policy (or at shutdown)",
         [({}, snap["frames_dropped"])]),
        ("edgestad_frames_bad", "counter", "Unusable frames (empty, wrong size or channels, unreadable)",
         [({}, snap["frames_bad"])]),
        ("edgestad_ng", "counter", "Frames judged NG", [({}, snap["ng_count"])]),
        ("edgestad_review", "counter", "Frames in the REVIEW band", [({}, snap.get("review_count", 0))]),
        ("edgestad_source_reconnects", "counter", "Successful source reconnects", [({}, snap["reconnects"])]),
        ("edgestad_source_losses", "counter", "Times the source was lost", [({}, snap["source_losses"])]),
        ("edgestad_inference_errors", "counter", "Failed inference calls", [({}, snap["inference_errors"])]),
        ("edgestad_sink_errors", "counter", "Failed output writes", [({}, snap["sink_errors"])]),
        ("edgestad_fps", "gauge", "Frames per second over the last 5 s", [({}, snap["fps_recent"])]),
        ("edgestad_latency_ms", "gauge", "Capture-to-result latency percentiles (recent frames)",
         [({"quantile": str(int(k[1:]) / 100)}, num(v)) for k, v in snap["latency_ms"].items()]),
        ("edgestad_inference_ms", "gauge", "Backend inference time percentiles (recent frames)",
         [({"quantile": str(int(k[1:]) / 100)}, num(v)) for k, v in snap["inference_ms"].items()]),
        ("edgestad_output_queue", "gauge", "Results waiting for the outputs (sinks falling behind if it stays high)",
         [({}, snap.get("output_queue", 0))]),
        ("edgestad_source_connected", "gauge", "1 while the source is open", [({}, int(bool(snap["source_connected"])))]),
        ("edgestad_last_result_age_seconds", "gauge", "Seconds since the last result", [({}, num(snap["last_result_age_s"]))]),
        ("edgestad_info", "gauge", "Backend and model identity (value is always 1)",
         [({"backend": str(snap["backend"]), "precision": str(snap.get("precision", "")),
            "model_sha256": str(snap.get("model_sha256", "")), "source": str(snap["source"])}, 1.0)]),
    ]
    return fams


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render_metrics_text(snap: dict) -> str:
    """Prometheus text exposition format 0.0.4, written by hand (no dependency)."""
    lines = []
    for name, kind, help_text, samples in metric_families(snap):
        sample_name = name + "_total" if kind == "counter" else name
        # As prometheus_client writes the 0.0.4 format: counters are named with _total throughout.
        lines.append(f"# HELP {sample_name} {help_text}")
        lines.append(f"# TYPE {sample_name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
            lines.append(f"{sample_name}{{{lab}}} {_fmt_value(value)}" if lab else f"{sample_name} {_fmt_value(value)}")
    return "\n".join(lines) + "\n"


def render_metrics_prometheus_client(snap: dict) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self):
            for name, kind, help_text, samples in metric_families(snap):
                keys = sorted({k for labels, _ in samples for k in labels})
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = cls(name, help_text, labels=keys)
                for labels, value in samples:
                    fam.add_metric([str(labels[k]) for k in keys], value)
                yield fam

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)


def render_metrics(snap: dict, use_prometheus_client: bool | None = None) -> tuple[bytes, str]:
    if use_prometheus_client is None:
        try:
            import prometheus_client  # noqa: F401

            use_prometheus_client = True
        except ImportError:
            use_prometheus_client = False
    if use_prometheus_client:
        from prometheus_client import CONTENT_TYPE_LATEST

        return render_metrics_prometheus_client(snap), CONTENT_TYPE_LATEST
    return render_metrics_text(snap).encode(), "text/plain; version=0.0.4; charset=utf-8"


# --------------------------------------------------------------------------- server

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>edgestad</title>
<style>body{{font-family:sans-serif;margin:1em;background:#111;color:#eee}}img{{max-width:100%}}
pre{{background:#222;padding:.5em}}</style></head><body>
<h1>edgestad</h1><p>{source} &middot; {backend}</p>
<p>OK <b id="ok">-</b> &middot; REVIEW <b id="rv">-</b> &middot; NG <b id="ng">-</b></p>
<img id="stream" src="/stream.mjpg" alt="overlay stream">
<p><a href="/status">/status</a> &middot; <a href="/metrics">/metrics</a></p>
<pre id="s"></pre>
<script>setInterval(()=>fetch('/status').then(r=>r.json()).then(j=>{{
document.getElementById('ok').textContent=j.frames_processed-j.ng_count-(j.review_count||0);
document.getElementById('rv').textContent=j.review_count||0;
document.getElementById('ng').textContent=j.ng_count;
document.getElementById('s').textContent=JSON.stringify({{fps:j.fps_recent,latency_ms:j.latency_ms,
frames:j.frames_processed,ng:j.ng_count,dropped:j.frames_dropped,reconnects:j.reconnects}},null,1)}}),1000)</script>
</body></html>"""


DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_CLIENTS = 32
DEFAULT_BACKLOG = 128

_BUSY_BODY = b"too many connections; retry later\n"
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
         % len(_BUSY_BODY)) + _BUSY_BODY


class _BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections served at once; the rest get a 503."""

    daemon_threads = True

    def __init__(self, address, handler, max_clients: int, backlog: int):
        self.max_clients = int(max_clients)
        self.request_queue_size = int(backlog)  # read by server_activate() -> listen(backlog)
        self.active = 0
        self.rejected = 0
        self.served = 0
        self._count_lock = threading.Lock()
        # Rejections are answered by one thread, never one per connection; a flood beyond this
        # queue is closed without an answer.
        self._reject_q: queue.Queue = queue.Queue(maxsize=256)
        self._rejector = threading.Thread(target=self._reject_loop, name="edgestad-http-503", daemon=True)
        super().__init__(address, handler)
        self._rejector.start()

    def process_request(self, request, client_address):
        with self._count_lock:
            admit = self.active < self.max_clients
            if admit:
                self.active += 1
                self.served += 1
            else:
                self.rejected += 1
        if admit:
            try:
                super().process_request(request, client_address)  # starts the connection's thread
            except BaseException:
                self._release()
                raise
            return
        try:
            self._reject_q.put_nowait(request)
        except queue.Full:
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count_lock:
            self.active -= 1

    def _reject_loop(self) -> None:
        while True:
            sock = self._reject_q.get()
            if sock is None:
                return
            try:
                sock.settimeout(0.5)
                sock.sendall(_BUSY)
                sock.shutdown(socket.SHUT_WR)
                # Read what the client sent (until it closes, 0.5 s at most) so that closing does
                # not reset the connection before the client has read the 503.
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline and sock.recv(65536):
                    pass
            except OSError:
                pass
            finally:
                try:
                    sock.close()
                except OSError:
                    pass

    def server_close(self):
        super().server_close()
        try:
            self._reject_q.put_nowait(None)
        except queue.Full:
            pass


class RuntimeHttpServer:
    """Serves the runtime's HTTP endpoints, one daemon thread per connection (bounded)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict], feed: OverlayFeed, *,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, max_clients: int = DEFAULT_MAX_CLIENTS,
                 backlog: int = DEFAULT_BACKLOG):
        if read_timeout_s <= 0 or max_clients < 1 or backlog < 1:
            raise OutputError(f"HTTP limits must be positive (read timeout {read_timeout_s}, "
                              f"max clients {max_clients}, backlog {backlog})")
        self.snapshot = snapshot
        self.feed = feed
        self.read_timeout_s = float(read_timeout_s)
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "edgestad"
            timeout = server.read_timeout_s  # socket timeout: idle reads and stalled writes
            _head = False

            def log_message(self, fmt, *args):  # access logs would flood journald at MJPEG rates
                log.debug("%s %s", self.address_string(), fmt % args)

            def do_HEAD(self):  # noqa: N802 - http.server naming
                self._head = True
                try:
                    self.do_GET()
                finally:
                    self._head = False

            def do_GET(self):  # noqa: N802 - http.server naming
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/":
                        snap = server.snapshot()
                        self._send(200, _PAGE.format(source=snap["source"], backend=snap["backend"]).encode(),
                                   "text/html; charset=utf-8")
                    elif path == "/status":
                        self._send(200, json.dumps(server.snapshot(), default=str).encode(), "application/json")
                    elif path == "/metrics":
                        body, ctype = render_metrics(server.snapshot())
                        self._send(200, body, ctype)
                    elif path == "/stream.mjpg":
                        self._stream()
                    else:
                        self._send(404, b"not found\n", "text/plain")
                except OSError:  # client gone, or a write blocked past the timeout
                    self.close_connection = True

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if not self._head:
                    self.wfile.write(body)

            def _stream(self) -> None:
                self.close_connection = True
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.end_headers()
                if self._head:
                    return
                seq = 0
                while not server._stopping.is_set():
                    got = server.feed.wait_jpeg(seq, timeout=1.0)
                    if got is None:
                        if server.feed.closed:
                            return
                        continue
                    seq, jpeg = got
                    sent_at = time.monotonic()
                    self.wfile.write(
                        f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                        + jpeg + b"\r\n"
                    )
                    self.wfile.flush()
                    # Rate cap per client (at most max_fps parts a second): skip frames, never queue them.
                    wait = sent_at + server.feed.min_interval - time.monotonic()
                    if wait > 0:
                        server._stopping.wait(wait)

        try:
            self.httpd = _BoundedHTTPServer((host, port), Handler, max_clients=max_clients, backlog=backlog)
        except OSError as exc:
            raise OutputError(f"cannot serve HTTP on {host}:{port}: {exc}") from None
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgestad-http", daemon=True)

    @property
    def active_connections(self) -> int:
        return self.httpd.active

    @property
    def rejected_connections(self) -> int:
        return self.httpd.rejected

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "RuntimeHttpServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self.feed.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
