"""HTTP server limits over real loopback sockets: HEAD, the read timeout (idle connections closed,
their threads freed), the connection bound (503 beyond it) and the listen backlog."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
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


def connection_threads() -> int:
    """Threads that serve one HTTP connection each (ThreadingMixIn names them after their target)."""
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


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
    assert srv.httpd.request_queue_size == DEFAULT_BACKLOG >= 128
    assert srv.httpd.max_clients >= 8


def test_head_answers_headers_only(serve):
    srv = serve()
    conn = http.client.HTTPConnection(*srv.address, timeout=10)
    for path, status, ctype in (("/", 200, "text/html; charset=utf-8"), ("/status", 200, "application/json"),
                                ("/metrics", 200, None), ("/nope", 404, "text/plain")):
        conn.request("GET", path)
        get = conn.getresponse()
        body = get.read()
        conn.request("HEAD", path)  # same keep-alive connection: a stray body would corrupt the next answer
        head = conn.getresponse()
        assert head.status == status == get.status, path
        assert head.read() == b""
        assert int(head.getheader("Content-Length")) == len(body)
        if ctype:
            assert head.getheader("Content-Type") == ctype
    conn.request("GET", "/status")
    assert conn.getresponse().status == 200
    conn.close()
    conn = http.client.HTTPConnection(*srv.address, timeout=10)
    conn.request("HEAD", "/stream.mjpg")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("multipart/x-mixed-replace")
    conn.close()


def test_idle_connections_are_closed_after_the_read_timeout_and_threads_freed(serve):
    srv = serve(read_timeout_s=0.6, max_clients=64)
    base = connection_threads()
    idle = [socket.create_connection(srv.address, timeout=10) for _ in range(12)]
    # one keep-alive client that made a request and then went quiet
    keep = http.client.HTTPConnection(*srv.address, timeout=10)
    keep.request("GET", "/status")
    assert keep.getresponse().read()
    assert wait_for(lambda: srv.active_connections == 13 and connection_threads() == base + 13)
    t0 = time.monotonic()
    for s in idle:
        assert s.recv(1) == b""  # the server closed it (EOF), not our 10 s client timeout
    assert keep.sock.recv(1) == b""
    assert 0.5 < time.monotonic() - t0 < 5
    assert wait_for(lambda: srv.active_connections == 0 and connection_threads() == base, timeout=5)
    for s in idle:
        s.close()
    keep.close()
    # a slow request (headers never finished) is cut off the same way
    s = socket.create_connection(srv.address, timeout=10)
    s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
    assert s.recv(1) == b""
    s.close()
    assert wait_for(lambda: connection_threads() == base, timeout=5)


def test_clients_beyond_the_bound_get_503(serve):
    srv = serve(read_timeout_s=20, max_clients=3)
    base = connection_threads()
    held = [socket.create_connection(srv.address, timeout=10) for _ in range(3)]
    assert wait_for(lambda: srv.active_connections == 3)
    for _ in range(5):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(srv.url + "/status", timeout=10)
        assert err.value.code == 503 and err.value.headers["Retry-After"] == "1"
    assert srv.rejected_connections == 5
    assert connection_threads() == base + 3  # rejected clients got no thread of their own
    held.pop().close()
    assert wait_for(lambda: srv.active_connections == 2)
    with urllib.request.urlopen(srv.url + "/status", timeout=10) as r:
        assert r.status == 200
    for s in held:
        s.close()
    assert wait_for(lambda: srv.active_connections == 0 and connection_threads() == base)


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


def test_stream_rate_cap_holds_per_client(serve):
    """max_fps is a cap per viewer: a 50 fps source seen through a 10 fps cap gives ~10 parts/s."""
    import numpy as np

    from edgestad.runtime.results import FrameResult

    srv = serve()
    feed = srv.feed
    feed.min_interval = 0.1
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            amap = np.zeros((8, 8), np.float32)
            feed.handle(FrameResult(i, "", time.time(), time.monotonic(), time.monotonic(), time.monotonic(),
                                    time.time(), 0.0, False, [], 0, amap, np.zeros((24, 32, 3), np.uint8), "BGR", (32, 24)))
            i += 1
            time.sleep(0.02)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    conn = http.client.HTTPConnection(*srv.address, timeout=10)
    conn.request("GET", "/stream.mjpg")
    r = conn.getresponse()
    parts, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < 2.0:
            line = r.readline()
            if line.startswith(b"Content-Length:"):
                r.readline()
                r.read(int(line.split(b":")[1]))
                parts += 1
    finally:
        stop.set()
        conn.close()
    assert 14 <= parts <= 23, parts  # 2 s at 10 fps (the old cap let ~20 fps through)
