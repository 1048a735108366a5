"""HTTP server limits over real loopback sockets: HEAD, idle and slow connections that cannot
hold the page up (one event loop, no thread per connection), the keep-alive timeout, the stream
bounds (503 / 429 beyond them), a burst of connects and the per-viewer stream rate cap."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request

import pytest

from edgestad.runtime.http import DEFAULT_BACKLOG, DEFAULT_READ_TIMEOUT_S, OverlayFeed, RuntimeHttpServer
from edgestad.runtime.results import Thresholds
from helpers import wait_for as _wait_for  # noqa: E402

SNAP = {"source": "camera 0", "backend": "onnxruntime:CPUExecutionProvider", "frames_processed": 3,
        "frames_captured": 3, "frames_dropped": 0, "frames_bad": 0, "ng_count": 1, "reconnects": 0,
        "source_losses": 0, "inference_errors": 0, "sink_errors": 0, "fps_recent": 1.0,
        "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0}, "inference_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0},
        "output_queue": 0, "source_connected": True, "last_result_age_s": 0.1, "precision": "fp32",
        "model_sha256": "0" * 64}


def wait_for(pred, timeout=10.0) -> bool:
    return _wait_for(pred, timeout)


@pytest.fixture
def serve():
    servers = []

    def start(**kw):
        srv = RuntimeHttpServer("127.0.0.1", 0, lambda: dict(SNAP), OverlayFeed(Thresholds(0.5, 0.5)), **kw).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


def test_defaults_suit_a_plant_network(serve):
    srv = serve()
    assert 0 < DEFAULT_READ_TIMEOUT_S <= 60 and srv.read_timeout_s == DEFAULT_READ_TIMEOUT_S
    assert srv.backlog == DEFAULT_BACKLOG >= 128
    assert srv.max_streams >= 8 and srv.max_streams_per_client >= 2
    assert srv._thread.name == "edgestad-http"   # one thread serves every connection


def test_head_answers_headers_only(serve):
    srv = serve()
    conn = http.client.HTTPConnection(*srv.address, timeout=10)
    for path, status, ctype in (("/", 200, "text/html"), ("/status", 200, "application/json"),
                                ("/metrics", 200, None), ("/static/station.js", 200, None),
                                ("/nope", 404, "text/plain")):
        conn.request("GET", path)
        get = conn.getresponse()
        body = get.read()
        conn.request("HEAD", path)  # same keep-alive connection: a stray body would corrupt the next answer
        head = conn.getresponse()
        assert head.status == status == get.status, path
        assert head.read() == b""
        assert int(head.getheader("Content-Length")) == len(body)
        if ctype:
            assert head.getheader("Content-Type").startswith(ctype), path
    conn.request("GET", "/status")
    assert conn.getresponse().status == 200
    conn.close()
    conn = http.client.HTTPConnection(*srv.address, timeout=10)
    conn.request("HEAD", "/stream.mjpg")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("multipart/x-mixed-replace")
    conn.close()


def test_idle_and_slow_connections_do_not_hold_up_the_page(serve):
    """300 sockets that send nothing and 20 that send a request one byte at a time: /status and
    / still answer at once (the old thread-per-connection server timed out for ~30 s)."""
    srv = serve()
    idle = [socket.create_connection(srv.address, timeout=10) for _ in range(300)]
    slow = [socket.create_connection(srv.address, timeout=10) for _ in range(20)]
    for s in slow:
        s.sendall(b"G")
    worst = 0.0
    try:
        for i in range(20):
            for path in ("/status", "/"):
                t0 = time.monotonic()
                with urllib.request.urlopen(srv.url + path, timeout=5) as r:
                    assert r.status == 200
                    r.read()
                worst = max(worst, time.monotonic() - t0)
            for s in slow:
                s.sendall(b"ET /status HTTP/1.1\r\n"[i:i + 1] if i < 20 else b"")
        assert worst < 1.0, f"slowest answer {worst:.2f} s"
    finally:
        for s in idle + slow:
            s.close()


def test_a_keep_alive_connection_is_closed_after_the_read_timeout(serve):
    srv = serve(read_timeout_s=0.6)
    keep = http.client.HTTPConnection(*srv.address, timeout=10)
    keep.request("GET", "/status")
    assert keep.getresponse().read()
    t0 = time.monotonic()
    assert keep.sock.recv(1) == b""   # the server closed it (EOF), not our 10 s client timeout
    assert time.monotonic() - t0 < 5
    keep.close()


def test_streams_beyond_the_bounds_get_503_and_429(serve):
    srv = serve(max_clients=3, max_streams_per_client=2)

    def open_stream():
        c = http.client.HTTPConnection(*srv.address, timeout=10)
        c.request("GET", "/stream.mjpg")
        return c, c.getresponse()

    held = [open_stream(), open_stream()]
    assert all(r.status == 200 for _, r in held)
    c, r = open_stream()                       # a third from the same address
    assert r.status == 429 and r.getheader("Retry-After")
    r.close()
    c.close()
    assert wait_for(lambda: srv.active_streams == 2)
    srv.max_streams_per_client = 5
    held.append(open_stream())
    c, r = open_stream()                       # beyond the total
    assert r.status == 503 and r.getheader("Retry-After") == "1"
    r.close()
    c.close()
    assert srv.rejected_connections == 2
    with urllib.request.urlopen(srv.url + "/status", timeout=10) as resp:   # the page is not a stream
        assert resp.status == 200
    for c, r in held:   # the response holds the socket too
        r.close()
        c.close()
    assert wait_for(lambda: srv.active_streams == 0)


def test_a_burst_of_connects_is_queued_not_refused(serve):
    srv = serve(max_clients=200)
    results = []

    def client():
        try:
            with urllib.request.urlopen(srv.url + "/status", timeout=20) as r:
                results.append(r.status)
        except Exception as exc:  # noqa: BLE001
            results.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(120)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(200) == 120, [r for r in results if r != 200][:3]


def _produce(feed, stop: threading.Event, period: float = 0.02) -> threading.Thread:
    """A fast source: a new result every ``period`` s into the feed until ``stop``."""
    import numpy as np

    from edgestad.runtime.results import FrameResult

    def produce():
        i = 0
        while not stop.is_set():
            amap = np.zeros((8, 8), np.float32)
            feed.handle(FrameResult(i, "", time.time(), time.monotonic(), time.monotonic(), time.monotonic(),
                                    time.time(), 0.0, False, [], 0, amap, np.zeros((24, 32, 3), np.uint8), "BGR", (32, 24)))
            i += 1
            time.sleep(period)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    return producer


def _count_parts(address, seconds: float) -> int:
    """MJPEG parts one viewer receives in ``seconds``."""
    conn = http.client.HTTPConnection(*address, timeout=10)
    conn.request("GET", "/stream.mjpg")
    r = conn.getresponse()
    parts, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            line = r.readline()
            if line.startswith(b"Content-Length:"):
                r.readline()
                r.read(int(line.split(b":")[1]))
                parts += 1
    finally:
        conn.close()
    return parts


def test_stream_rate_cap_holds_per_client(serve):
    """max_fps is a cap per viewer: a 50 fps source seen through a 10 fps cap gives ~10 parts/s."""
    srv = serve()
    srv.feed.min_interval = 0.1
    stop = threading.Event()
    _produce(srv.feed, stop)
    try:
        parts = _count_parts(srv.address, 2.0)
    finally:
        stop.set()
    assert 14 <= parts <= 23, parts  # 2 s at 10 fps (the old cap let ~20 fps through)


def test_viewers_share_one_encoding(serve):
    """Five viewers of a 50 fps source at a 10 fps cap each get ~10 parts/s, and the device encodes
    ~10 JPEGs/s for all of them (each viewer encoding its own frame cost ~50/s)."""
    srv = serve()
    srv.feed.min_interval = 0.1
    stop = threading.Event()
    _produce(srv.feed, stop)
    parts: list[int] = []
    viewers = [threading.Thread(target=lambda: parts.append(_count_parts(srv.address, 2.0))) for _ in range(5)]
    try:
        before = srv.feed.encodings
        for v in viewers:
            v.start()
        for v in viewers:
            v.join(10)
        encoded = srv.feed.encodings - before
    finally:
        stop.set()
    assert len(parts) == 5 and all(12 <= p <= 23 for p in parts), parts
    assert encoded <= 26, encoded      # 2 s (plus connection set-up) at 10 encodings a second


def test_a_fast_source_wakes_the_page_only_when_a_viewer_waits(serve):
    """A 200 fps source, one viewer at a 10 fps cap: the viewer still gets ~10 parts/s, and the
    output thread wakes the server's loop only when the viewer is waiting for a frame, not for
    every frame (each wake-up is a cross-thread call the inference competes with)."""
    srv = serve()
    srv.feed.min_interval = 0.1
    wakes = []
    wake = srv._wake
    srv._wake = lambda attr: (wakes.append(attr), wake(attr))
    stop = threading.Event()
    _produce(srv.feed, stop, period=0.005)
    try:
        frames_before = srv.feed.seq
        parts = _count_parts(srv.address, 2.0)
        frames = srv.feed.seq - frames_before
    finally:
        stop.set()
    assert 14 <= parts <= 23, parts
    assert frames > 150, frames              # the source really ran faster than the stream
    assert len(wakes) <= frames / 4, (len(wakes), frames)
