"""HTTP endpoints over real loopback sockets, and the webhook sink against a real local server."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgestad.bundle import load_bundle
from edgestad.runtime.backends import select_backend
from edgestad.runtime.http import BOUNDARY, OverlayFeed, RuntimeHttpServer, render_metrics
from edgestad.runtime.pipeline import Pipeline
from edgestad.runtime.preprocess import InputSpec, Preprocessor
from edgestad.runtime.results import Thresholds
from edgestad.runtime.sinks import WebhookSink
from edgestad.runtime.sources import SourceSpec
from helpers import PacedCamera, Receiver, wait_for
from test_runtime_toy import frame_with_spot, make_toy_bundle


def slow_camera():
    """A live source at ~100 fps whose every 4th frame has a bright 'defect'."""
    return PacedCamera(lambda i: frame_with_spot(i, spot=i % 4 == 0), 0.01)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    bundle = load_bundle(make_toy_bundle(tmp_path_factory.mktemp("b") / "b", 48, 64))
    thr = Thresholds.from_manifest(bundle.manifest)
    feed = OverlayFeed(thr, max_fps=50)
    pipe = Pipeline(SourceSpec("camera", "7"), select_backend(bundle.path, bundle.manifest, "onnxruntime"),
                    Preprocessor(InputSpec.from_manifest(bundle.manifest)), thr, [feed],
                    source_factory=slow_camera)
    server = RuntimeHttpServer("127.0.0.1", 0, pipe.snapshot, feed).start()
    t = threading.Thread(target=pipe.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while pipe.ng_count < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    yield pipe, server
    pipe.stop()
    t.join(10)
    server.close()


def get(server, path):
    with urllib.request.urlopen(server.url + path, timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def test_binds_loopback_by_default(running):
    assert running[1].address[0] == "127.0.0.1"


def test_status_json(running):
    pipe, server = running
    status, ctype, body = get(server, "/status")
    s = json.loads(body)
    assert status == 200 and ctype.startswith("application/json")
    assert s["backend"] == "onnxruntime:CPUExecutionProvider" and s["running"]
    assert s["frames_processed"] > 0 and s["ng_count"] >= 2 and len(s["model_sha256"]) == 64
    assert s["latency_ms"]["p50"] > 0 and s["last_result"]["frame"] > 0


def test_metrics_prometheus_format(running):
    pipe, server = running
    status, ctype, body = get(server, "/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert status == 200 and ctype.startswith("text/plain")
    assert fams["edgestad_frames_processed"].type == "counter"
    assert fams["edgestad_frames_processed"].samples[0].value > 0
    assert {s.labels["quantile"] for s in fams["edgestad_latency_ms"].samples} == {"0.5", "0.9", "0.95", "0.99"}
    info = fams["edgestad_info"].samples[0].labels
    assert info["backend"] == "onnxruntime:CPUExecutionProvider" and len(info["model_sha256"]) == 64
    for name in ("edgestad_fps", "edgestad_frames_dropped", "edgestad_ng", "edgestad_source_reconnects"):
        assert name in fams


def test_metrics_fallback_writer_matches_prometheus_client(running):
    snap = running[0].snapshot()
    ours, _ = render_metrics(snap, use_prometheus_client=False)
    theirs, _ = render_metrics(snap, use_prometheus_client=True)

    def parsed(text):
        return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text.decode()) for s in f.samples}

    assert parsed(ours) == parsed(theirs)


def test_mjpeg_stream_delivers_overlay_frames(running):
    pipe, server = running
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/stream.mjpg")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
    images = []
    for _ in range(3):
        assert resp.readline().strip() == f"--{BOUNDARY}".encode()
        headers = {}
        while (line := resp.readline().strip()):
            k, v = line.decode().split(":", 1)
            headers[k.lower()] = v.strip()
        jpeg = resp.read(int(headers["content-length"]))
        resp.readline()
        images.append(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
    conn.close()
    assert all(img is not None and img.shape == (120, 160, 3) for img in images)


def test_index_page_and_404(running):
    status, ctype, body = get(running[1], "/")
    assert status == 200 and b"/stream.mjpg" in body
    with pytest.raises(urllib.error.HTTPError) as err:
        get(running[1], "/nope")
    assert err.value.code == 404


def test_webhook_posts_ng_events_to_a_real_server(running):
    hook = Receiver()
    try:
        sink = WebhookSink(hook.url)
        pipe = running[0]
        pipe.sinks.append(sink)  # the output thread iterates over the list: picked up at once
        assert wait_for(lambda: len(hook.delivered) >= 2, timeout=10)
        pipe.sinks.remove(sink)
        sink.close()
    finally:
        hook.close()
    received = hook.delivered
    assert len(received) >= 2 and all(r["event"] == "ng" and r["is_ng"] for r in received)
    assert sink.failed == 0 and sink.sent == len(received)


def test_port_in_use_is_a_clear_error(running):
    from edgestad.runtime.errors import OutputError

    host, port = running[1].address
    with pytest.raises(OutputError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
        RuntimeHttpServer(host, port, running[0].snapshot, running[1].feed)
