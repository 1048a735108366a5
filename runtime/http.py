"""The runtime's HTTP server: the operator page, its live updates, the stream and the API.

One event-driven server (aiohttp on its own asyncio loop in one thread): an idle or slow socket
costs a file descriptor and a few kilobytes, never a thread, so a few hundred idle connections or
clients that send one byte every ten seconds cannot take the page down (measured in
``studies/http_load.py``). The server binds 127.0.0.1 unless told otherwise.

Endpoints (``GET`` and ``HEAD``):

- ``/`` the operator page (``runtime/static/``: HTML, CSS and JS shipped with the package, no CDN);
- ``/api/live`` server-sent events: the lamp's state after each part (at most 5 a second) and a
  heartbeat every second; ``/api/state`` the same once (for polling clients);
- ``/api/scores?minutes=N`` score trend and histogram; ``/api/gallery`` the newest NG/REVIEW parts
  of the NG store (``--save-ng``); ``/ng/<file>`` their images and maps; ``/api/health``;
  ``/api/thresholds`` the thresholds and their change history; ``/api/me`` who is logged in;
- ``/stream.mjpg`` (``?overlay=0`` for the plain frames), ``/frame.jpg``, ``/status``, ``/metrics``.

State changes (``POST``, a lead's session and its CSRF token): ``/api/login``, ``/api/logout``,
``/api/thresholds`` (image / REVIEW thresholds, recorded through ``edgestad thresholds``' path),
``/api/thresholds/revert``, ``/api/capture`` (save a frame as good or defective for the next
training). Viewing is open on loopback; bound to any other address it needs a login too.

Limits: at most ``max_streams`` MJPEG/SSE streams in all (``http_max_clients``) and
``max_streams_per_client`` per address (``429`` beyond it); a stream write that does not drain
within ``read_timeout_s`` drops that viewer; request bodies ≤ 64 KiB; keep-alive connections are
closed after ``read_timeout_s`` of silence. Overlays are JPEG-encoded lazily: only while someone
watches, and one encoding serves every viewer for ``1 / max_fps`` s, so five viewers cost what one
does (measured in ``studies/station_viewers.py``). The live state is serialised once per update
and ``/api/scores`` summarised at most once a second per window, whoever asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import cv2

from .errors import OutputError
from .results import FrameResult, Thresholds, render_overlay
from .sinks import Sink
from .station import StationError

log = logging.getLogger("edgestad.runtime.http")

BOUNDARY = "edgestadframe"
STATIC = Path(__file__).with_name("static")
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_CLIENTS = 32          # streams (MJPEG + live updates) at once
DEFAULT_STREAMS_PER_CLIENT = 6    # per address: a tablet with the page and a stream open uses 2
DEFAULT_BACKLOG = 512
MAX_BODY = 64 * 1024
LIVE_MIN_INTERVAL_S = 0.2
SCORES_CACHE_S = 1.0              # /api/scores answers from a summary at most this old


class OverlayFeed(Sink):
    """Keeps the latest result; encodes its picture (overlay or plain) as JPEG on demand, cached
    per frame, so any number of viewers cost one encoding per frame and no viewer costs none."""

    name = "http_stream"

    def __init__(self, thresholds: Thresholds, max_fps: float = 15.0, jpeg_quality: int = 80):
        self.thresholds = thresholds
        self.min_interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self.jpeg_quality = jpeg_quality
        self._cond = threading.Condition()
        self._result: FrameResult | None = None
        self._seq = 0
        self._jpeg: dict[bool, tuple[int, bytes]] = {}
        self._encoded_at: dict[bool, float] = {}
        self.encodings = 0              # JPEGs encoded so far (what viewers cost the device)
        self._listeners: list[Callable[[], None]] = []
        self.closed = False

    def listen(self, callback: Callable[[], None]) -> None:
        """``callback()`` after each new frame (from the output thread: must be quick)."""
        self._listeners.append(callback)

    def handle(self, result: FrameResult) -> None:
        with self._cond:
            self._result = result
            self._seq += 1
            self._cond.notify_all()
        for cb in self._listeners:
            cb()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        for cb in self._listeners:
            cb()

    @property
    def seq(self) -> int:
        return self._seq

    def jpeg(self, overlay: bool = True) -> tuple[int, bytes] | None:
        """(frame sequence number, JPEG) of the latest frame. One encoding serves every viewer for
        ``1 / max_fps`` s: viewers cost at most ``max_fps`` encodings a second per picture kind,
        however many watch and however fast the source runs."""
        now = time.monotonic()
        with self._cond:
            seq, result = self._seq, self._result
            if result is None:
                return None
            cached = self._current(overlay, now)
            if cached is not None:
                return cached
        picture = render_overlay(result, self.thresholds) if overlay else result.frame_bgr()
        if picture is None:
            return None
        ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            return None
        with self._cond:
            self._jpeg[overlay] = (seq, buf.tobytes())
            self._encoded_at[overlay] = now
            self.encodings += 1
            return self._jpeg[overlay]

    def _current(self, overlay: bool, now: float) -> tuple[int, bytes] | None:
        cached = self._jpeg.get(overlay)
        if cached is not None and (cached[0] == self._seq or now - self._encoded_at[overlay] < self.min_interval):
            return cached
        return None

    def cached_jpeg(self, overlay: bool = True) -> tuple[int, bytes] | None:
        """The shared JPEG when it is still the one to serve (no encoding needed), else None: the
        server's loop takes it without handing the call to the encoder thread."""
        with self._cond:
            return self._current(overlay, time.monotonic())

    def wait_jpeg(self, after_seq: int, timeout: float, overlay: bool = True) -> tuple[int, bytes] | None:
        """The JPEG of the first frame newer than ``after_seq``, or None on timeout/close (for
        threaded callers; the server itself never blocks a thread on it)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._seq > after_seq or self.closed, timeout):
                return None
        return self.jpeg(overlay)


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


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_open_file_limit() -> None:
    """Idle sockets cost file descriptors: lift the soft limit to the hard one (Linux default
    1024 would cap the server near a thousand idle connections)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536) if hard != resource.RLIM_INFINITY
                                                         else 65536, hard))
    except (ImportError, ValueError, OSError):
        pass


def _gone(request) -> bool:
    """The viewer closed its connection (noticed between frames, without a write)."""
    transport = request.transport
    return transport is None or transport.is_closing()


class RuntimeHttpServer:
    """The operator page, live updates, stream and API on one asyncio loop (one thread)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict], feed: OverlayFeed, *,
                 station=None, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 max_clients: int = DEFAULT_MAX_CLIENTS,
                 max_streams_per_client: int = DEFAULT_STREAMS_PER_CLIENT,
                 backlog: int = DEFAULT_BACKLOG):
        try:
            from aiohttp import web  # noqa: F401
        except ImportError:
            raise OutputError("--http needs the aiohttp package (pip install aiohttp)") from None
        if read_timeout_s <= 0 or max_clients < 1 or backlog < 1 or max_streams_per_client < 1:
            raise OutputError(f"HTTP limits must be positive (read timeout {read_timeout_s}, "
                              f"max clients {max_clients}, backlog {backlog})")
        self.snapshot = snapshot
        self.feed = feed
        self.station = station
        self.read_timeout_s = float(read_timeout_s)
        self.max_streams = int(max_clients)
        self.max_streams_per_client = int(max_streams_per_client)
        self.backlog = int(backlog)
        self.view_requires_login = not is_loopback(host)
        self.streams: dict[str, int] = {}
        self.rejected_connections = 0
        self._loop = asyncio.new_event_loop()
        self._encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgestad-jpeg")
        self._work = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgestad-http-work")
        self._frame_event: asyncio.Event | None = None
        self._result_event: asyncio.Event | None = None
        self._watchers = 0
        self._waiting = {"_frame_event": 0, "_result_event": 0}   # streams awaiting each event
        self._stopping = False
        self._live_cache: tuple[tuple[int, int], bytes] | None = None
        self._scores_cache: dict[float, tuple[float, dict]] = {}
        raise_open_file_limit()
        feed.listen(self._from_output_thread("_frame_event"))
        if station is not None:
            station.sink.listen(self._from_output_thread("_result_event"))
        started = threading.Event()
        self._start_error: BaseException | None = None
        self._host, self._port = host, port
        try:   # bound here, so a port in use is an error of the constructor, as before
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.create_server((host, port), family=family, backlog=self.backlog)
        except OSError as exc:
            self._loop.close()
            raise OutputError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
        self._address = self._sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, args=(started,), name="edgestad-http",
                                        daemon=True)
        self._started = started

    # ------------------------------------------------------------------ loop and lifecycle

    def _from_output_thread(self, attr: str) -> Callable[[], None]:
        """A callback for the output thread that wakes the loop, only when a stream is waiting on
        this event right now: without viewers the page costs nothing per frame, and with viewers
        a source faster than the stream's and the lamp's rates costs no wake-up per frame (a
        viewer rate-capped or busy reads the newest state when it next looks). No wake-up is
        lost: the frame's sequence number is bumped before this runs, and a waiter counts itself
        before it compares that number (``_next``), so one of the two sees the other."""
        def notify() -> None:
            if self._waiting[attr] and not self._loop.is_closed():
                try:
                    self._loop.call_soon_threadsafe(self._wake, attr)
                except RuntimeError:   # loop closed meanwhile
                    pass
        return notify

    def _wake(self, attr: str) -> None:
        event = getattr(self, attr)
        if event is not None:
            event.set()
            setattr(self, attr, asyncio.Event())

    async def _next(self, attr: str, changed: Callable[[], bool], timeout: float = 1.0) -> None:
        """Wait until ``changed()`` (a new frame or result) or ``timeout`` s."""
        self._waiting[attr] += 1
        try:
            if changed():
                return
            try:
                await asyncio.wait_for(getattr(self, attr).wait(), timeout=timeout)
            except asyncio.TimeoutError:
                pass
        finally:
            self._waiting[attr] -= 1

    def _versions(self) -> tuple[int, int]:
        """(frame, result) sequence numbers: what the live state was built from."""
        return self.feed.seq, (self.station.sink.seq if self.station is not None else 0)

    def _serve(self, started: threading.Event) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        self._frame_event = asyncio.Event()
        self._result_event = asyncio.Event()
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        self._routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.read_timeout_s, shutdown_timeout=1.0)
        try:
            self._loop.run_until_complete(self._runner.setup())
            site = web.SockSite(self._runner, self._sock, backlog=self.backlog)
            self._loop.run_until_complete(site.start())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._start_error = exc
            started.set()
            return
        started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> "RuntimeHttpServer":
        self._thread.start()
        self._started.wait(30)
        if self._start_error is not None:
            exc = self._start_error
            raise OutputError(f"cannot serve HTTP on {self._host}:{self._port}: {exc}") from None
        return self

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.feed.close()
        if self._thread.is_alive():
            def stop() -> None:
                for attr in ("_frame_event", "_result_event"):
                    self._wake(attr)
                self._loop.stop()
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(timeout=10)
        else:   # never started: release the bound socket and the loop
            self._sock.close()
            self._loop.close()
        self._encoder.shutdown(wait=False)
        self._work.shutdown(wait=False)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._address
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    @property
    def active_streams(self) -> int:
        return sum(self.streams.values())

    # ------------------------------------------------------------------ routing and guards

    def _routes(self, app) -> None:
        from aiohttp import web

        get = [("/", self.page), ("/static/{name}", self.static), ("/status", self.status),
               ("/metrics", self.metrics), ("/stream.mjpg", self.stream), ("/frame.jpg", self.frame),
               ("/api/live", self.live), ("/api/state", self.state), ("/api/scores", self.scores),
               ("/api/gallery", self.gallery), ("/ng/{name}", self.ng_file), ("/api/health", self.health),
               ("/api/thresholds", self.thresholds), ("/api/me", self.me)]
        post = [("/api/login", self.login), ("/api/logout", self.logout),
                ("/api/thresholds", self.set_thresholds), ("/api/thresholds/revert", self.revert),
                ("/api/capture", self.capture)]
        app.router.add_routes([web.get(p, h) for p, h in get] + [web.post(p, h) for p, h in post])

    OPEN_PATHS = ("/", "/api/me", "/api/login", "/api/logout")

    @staticmethod
    def _client(request) -> str:
        return request.remote or "?"

    def _session(self, request):
        if self.station is None:
            return None
        return self.station.sessions.get(request.cookies.get("edgestad_session"))

    async def _guard_impl(self, request, handler):
        from aiohttp import web

        path = request.path
        if (self.view_requires_login and request.method in ("GET", "HEAD")
                and path not in self.OPEN_PATHS and not path.startswith("/static/")
                and self._session(request) is None):
            return web.json_response({"error": "log in to view this station"}, status=401)
        if request.method == "POST" and path not in ("/api/login", "/api/logout"):
            session = self._session(request)
            if session is None:
                return web.json_response({"error": "log in as a lead to change anything"}, status=401)
            if request.headers.get("X-CSRF-Token") != session.csrf:
                return web.json_response({"error": "missing or wrong CSRF token; reload the page"},
                                         status=403)
            if session.role != "lead":
                return web.json_response({"error": f"{session.user} is a viewer; changes need a lead"},
                                         status=403)
        try:
            return await handler(request)
        except StationError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)

    @property
    def _guard(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            return await self._guard_impl(request, handler)
        return guard

    async def _json_body(self, request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise StationError("the request body must be JSON") from None
        if not isinstance(body, dict):
            raise StationError("the request body must be a JSON object")
        return body

    def _need_station(self):
        if self.station is None:
            raise StationError("the operator station is not enabled in this runtime", 404)
        return self.station

    async def _in_worker(self, fn, *args):
        return await self._loop.run_in_executor(self._work, fn, *args)

    # ------------------------------------------------------------------ pages and plain data

    async def page(self, request):
        from aiohttp import web

        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def static(self, request):
        from aiohttp import web

        name = request.match_info["name"]
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def status(self, request):
        from aiohttp import web

        return web.Response(text=json.dumps(self.snapshot(), default=str), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def metrics(self, request):
        from aiohttp import web

        body, ctype = render_metrics(self.snapshot())
        resp = web.Response(body=body, headers={"Cache-Control": "no-store"})
        resp.headers["Content-Type"] = ctype
        return resp

    def _state(self) -> dict:
        snap = self.snapshot()
        if self.station is None:
            last = snap.get("last_result") or {}
            return {"decision": last.get("decision"), "score": last.get("score"), "snapshot": snap}
        return self.station.state(snap)

    def _live_message(self, now: float) -> bytes:
        """The server-sent state, serialised once per update (and per second for the heartbeat)
        whoever watches."""
        key = (self._versions(), int(now))
        if self._live_cache is None or self._live_cache[0] != key:
            data = json.dumps(self._state(), default=str, separators=(",", ":"))
            self._live_cache = (key, f"data: {data}\n\n".encode())
        return self._live_cache[1]

    async def state(self, request):
        from aiohttp import web

        return web.json_response(self._state(), headers={"Cache-Control": "no-store"},
                                 dumps=lambda o: json.dumps(o, default=str))

    async def scores(self, request):
        from aiohttp import web

        station = self._need_station()
        try:
            minutes = float(request.query.get("minutes", "10"))
            if not 0 < minutes <= 24 * 60 or math.isnan(minutes):
                raise ValueError
        except ValueError:
            raise StationError(f"minutes: a number of minutes in (0, 1440], got "
                               f"{request.query.get('minutes')!r}") from None
        now = time.monotonic()
        cached = self._scores_cache.get(minutes)
        if cached is not None and now - cached[0] < SCORES_CACHE_S:
            summary = cached[1]
        else:   # tens of ms on a full store: in the worker, at most once a second per window
            summary = await self._in_worker(station.scores_summary, minutes)
            if len(self._scores_cache) > 16:
                self._scores_cache.clear()
            self._scores_cache[minutes] = (now, summary)
        return web.json_response(summary, headers={"Cache-Control": "no-store"})

    async def gallery(self, request):
        from aiohttp import web

        station = self._need_station()
        try:
            n = int(request.query.get("n", "24"))
        except ValueError:
            raise StationError(f"n: a whole number, got {request.query.get('n')!r}") from None
        items = await self._in_worker(station.gallery.items, max(0, min(n, 200)))
        return web.json_response({"enabled": station.gallery.folder is not None, "items": items},
                                 headers={"Cache-Control": "no-store"})

    async def ng_file(self, request):
        from aiohttp import web

        station = self._need_station()
        name = request.match_info["name"]
        if name.endswith("_map.png"):
            png = await self._in_worker(station.gallery.map_png, name[: -len("_map.png")],
                                        station.current_thresholds().pixel)
            if png is None:
                raise web.HTTPNotFound()
            return web.Response(body=png, content_type="image/png")
        path = station.gallery.path(name)
        if path is None or name.endswith(".npy"):
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def health(self, request):
        from aiohttp import web

        station = self._need_station()
        return web.json_response(await self._in_worker(station.health))

    async def thresholds(self, request):
        from aiohttp import web

        station = self._need_station()
        return web.json_response(await self._in_worker(station.thresholds_info))

    async def me(self, request):
        from aiohttp import web

        session = self._session(request)
        station = self.station
        return web.json_response({
            "user": session.user if session else None, "role": session.role if session else None,
            "csrf": session.csrf if session else None,
            "login_required_to_view": self.view_requires_login,
            "accounts": bool(station is not None and station.users is not None and station.users.users),
            "station": station is not None,
        }, headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ streams

    def _open_stream(self, request) -> str:
        from aiohttp import web

        client = self._client(request)
        if self.active_streams >= self.max_streams:
            self.rejected_connections += 1
            raise web.HTTPServiceUnavailable(text="too many viewers; retry later\n",
                                             headers={"Retry-After": "1"})
        if self.streams.get(client, 0) >= self.max_streams_per_client:
            self.rejected_connections += 1
            raise web.HTTPTooManyRequests(text=f"at most {self.max_streams_per_client} streams "
                                               f"per client\n", headers={"Retry-After": "5"})
        self.streams[client] = self.streams.get(client, 0) + 1
        self._watchers += 1
        return client

    def _close_stream(self, client: str) -> None:
        self._watchers -= 1
        self.streams[client] -= 1
        if not self.streams[client]:
            del self.streams[client]

    async def _write(self, resp, data: bytes) -> None:
        await asyncio.wait_for(resp.write(data), timeout=self.read_timeout_s)

    async def _serve_stream(self, request, headers: dict, parts) -> Any:
        """A long response (MJPEG or server-sent events): HEAD answers headers only; otherwise the
        stream counts against the bounds while ``parts(resp)`` writes it, until the viewer goes, a
        write does not drain in time, or the server stops."""
        from aiohttp import web

        resp = web.StreamResponse(headers=headers)
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        client = self._open_stream(request)
        try:
            await resp.prepare(request)
            await parts(resp)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self._close_stream(client)
        return resp

    async def stream(self, request):
        overlay = request.query.get("overlay", "1") != "0"

        async def parts(resp) -> None:
            seq = -1
            while not self._stopping and not self.feed.closed and not _gone(request):
                if self.feed.seq == seq or self.feed.seq == 0:
                    await self._next("_frame_event", lambda: self.feed.seq not in (seq, 0))
                    continue
                got = (self.feed.cached_jpeg(overlay)
                       or await self._loop.run_in_executor(self._encoder, self.feed.jpeg, overlay))
                if got is None:
                    await asyncio.sleep(0.05)
                    continue
                if got[0] == seq:       # the shared encoding is still the one this viewer has
                    await asyncio.sleep(self.feed.min_interval / 2 or 0.01)
                    continue
                seq, jpeg = got
                sent_at = time.monotonic()
                await self._write(resp, f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                                        f"Content-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n")
                # Rate cap per viewer (at most max_fps parts a second): skip frames, never queue them.
                wait = sent_at + self.feed.min_interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)

        return await self._serve_stream(request, {
            "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            "Cache-Control": "no-store", "Connection": "close"}, parts)

    async def frame(self, request):
        from aiohttp import web

        overlay = request.query.get("overlay", "1") != "0"
        got = await self._loop.run_in_executor(self._encoder, self.feed.jpeg, overlay)
        if got is None:
            raise web.HTTPNotFound(text="no frame yet\n")
        return web.Response(body=got[1], content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def live(self, request):
        """Server-sent events: the lamp's state after each part (≤ 5/s), a heartbeat each second."""
        async def parts(resp) -> None:
            await self._write(resp, b"retry: 1000\n\n")
            while not self._stopping and not _gone(request):
                sent_at = time.monotonic()
                sent = self._versions()
                await self._write(resp, self._live_message(sent_at))
                await self._next("_result_event" if self.station is not None else "_frame_event",
                                 lambda: self._versions() != sent)
                wait = sent_at + LIVE_MIN_INTERVAL_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)

        return await self._serve_stream(request, {"Content-Type": "text/event-stream",
                                                  "Cache-Control": "no-store", "X-Accel-Buffering": "no"}, parts)

    # ------------------------------------------------------------------ accounts and changes

    async def login(self, request):
        from aiohttp import web

        station = self._need_station()
        body = await self._json_body(request)
        user, password = body.get("user"), body.get("password")
        if not isinstance(user, str) or not isinstance(password, str):
            raise StationError("user and password are needed")
        if station.users is None or not station.users.users:
            raise StationError("no accounts on this station: add a lead with `edgestad users add NAME "
                               "--role lead` and restart the runtime", 403)
        client = self._client(request)
        keys = (f"addr:{client}", f"user:{user}")
        wait = station.sessions.blocked_for(*keys)
        if wait > 0:
            return web.json_response({"error": f"too many failed logins; try again in {math.ceil(wait)} s"},
                                     status=429, headers={"Retry-After": str(math.ceil(wait))})
        role = await self._in_worker(station.users.check, user, password)
        if role is None:
            station.sessions.failed(*keys)
            log.warning("failed login for %r from %s", user, client)
            raise StationError("unknown user or wrong password", 401)
        token, session = station.sessions.create(user, role)
        log.info("%s (%s) logged in from %s", user, role, client)
        resp = web.json_response({"user": user, "role": role, "csrf": session.csrf})
        resp.set_cookie("edgestad_session", token, httponly=True, samesite="Strict", path="/",
                        max_age=int(station.sessions.lifetime_s))
        return resp

    async def logout(self, request):
        from aiohttp import web

        if self.station is not None:
            self.station.sessions.end(request.cookies.get("edgestad_session"))
        resp = web.json_response({"user": None})
        resp.del_cookie("edgestad_session", path="/")
        return resp

    async def _lead_action(self, request, action: str):
        """Run the station's ``action`` (user, request body) in the worker; its answer as JSON."""
        from aiohttp import web

        station = self._need_station()
        body = await self._json_body(request)
        out = await self._in_worker(getattr(station, action), self._session(request).user, body)
        return web.json_response(out)

    async def set_thresholds(self, request):
        response = await self._lead_action(request, "change_thresholds")
        self._scores_cache.clear()       # the histogram's lines move now, not a second later
        return response

    async def revert(self, request):
        response = await self._lead_action(request, "revert_thresholds")
        self._scores_cache.clear()
        return response

    async def capture(self, request):
        return await self._lead_action(request, "capture")
