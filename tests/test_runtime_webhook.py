"""The webhook sink against real local HTTP servers that fail: retries with exponential backoff,
at-least-once delivery, and the on-disk outbox that survives a restart of the runtime."""

from __future__ import annotations

import json
import time

import pytest

from edgestad.runtime.sinks import WebhookSink
from helpers import Receiver, free_port, wait_for  # noqa: E402



def ng_event(i: int) -> dict:
    return {"event": "ng", "frame": i, "is_ng": True, "score": 1.0}


def test_intermittent_failures_are_retried_until_every_event_arrived(tmp_path):
    # every 2nd request -> 500, every 4th connection dropped without an answer
    rx = Receiver(plan=lambda n: "drop" if n % 4 == 0 else (500 if n % 2 == 0 else 204))
    sink = WebhookSink(rx.url, outbox_dir=tmp_path / "outbox", backoff_initial=0.01, backoff_max=0.05)
    try:
        for i in range(30):
            sink.offer(ng_event(i))
        assert wait_for(lambda: sink.pending == 0)
    finally:
        sink.close()
        rx.close()
    got = [r["frame"] for r in rx.delivered]
    assert set(got) == set(range(30))  # at least once, every one
    assert got == sorted(got)  # oldest first, one at a time
    assert sink.sent == len(got) and sink.failed >= 25 and sink.rejected == sink.dropped == 0
    assert not list((tmp_path / "outbox").iterdir())  # delivered events leave the outbox


def test_retries_back_off_exponentially_and_reset_after_success():
    rx = Receiver(plan=lambda n: 503 if n <= 5 else 204)
    sink = WebhookSink(rx.url, backoff_initial=0.1, backoff_max=10)
    try:
        sink.offer(ng_event(1))
        assert wait_for(lambda: sink.sent == 1)
        assert sink.delay == 0.0
        sink.offer(ng_event(2))
        assert wait_for(lambda: sink.sent == 2, timeout=5)
    finally:
        sink.close()
        rx.close()
    gaps = [b - a for a, b in zip(rx.times, rx.times[1:6])]
    expected = [0.1, 0.2, 0.4, 0.8, 1.6]
    assert all(e * 0.9 <= g < e + 0.5 for g, e in zip(gaps, expected)), gaps
    assert rx.times[6] - rx.times[5] < 0.5  # after a success the next event goes at once
    assert [r["frame"] for r in rx.delivered] == [1, 2] and sink.failed == 5


def test_outbox_survives_a_runtime_restart_while_the_server_is_down(tmp_path):
    port = free_port()  # nothing listens: connection refused
    outbox = tmp_path / "events" / "webhook-outbox"
    first = WebhookSink(f"http://127.0.0.1:{port}/ng", outbox_dir=outbox, backoff_initial=0.05, backoff_max=0.2)
    for i in range(12):
        first.offer(ng_event(i))
    assert wait_for(lambda: first.failed >= 3)
    first.close(timeout=0.3)  # the runtime stops with everything undelivered
    assert not first._thread.is_alive()
    assert first.sent == 0 and len(list(outbox.glob("*.json"))) == 12

    second = WebhookSink(f"http://127.0.0.1:{port}/ng", outbox_dir=outbox, backoff_initial=0.05, backoff_max=0.2)
    assert second.pending == 12
    second.offer(ng_event(12))
    time.sleep(0.3)
    rx = Receiver(port=port)  # the server comes back
    try:
        assert wait_for(lambda: second.pending == 0)
    finally:
        second.close()
        rx.close()
    assert [r["frame"] for r in rx.delivered] == list(range(13))
    assert not list(outbox.glob("*.json"))


def test_outbox_is_bounded_and_keeps_the_newest(tmp_path):
    port = free_port()
    sink = WebhookSink(f"http://127.0.0.1:{port}/ng", outbox_dir=tmp_path / "o", max_outbox=5,
                       backoff_initial=5, backoff_max=5)
    for i in range(8):
        sink.offer(ng_event(i))
    sink.close(timeout=0.1)
    assert sink.dropped == 3 and sink.pending == 5
    kept = sorted(json.loads(p.read_text())["frame"] for p in (tmp_path / "o").glob("*.json"))
    assert kept == [3, 4, 5, 6, 7]


def test_a_4xx_refusal_is_not_retried_forever():
    rx = Receiver(plan=lambda n: 400 if n == 1 else 204)
    sink = WebhookSink(rx.url, backoff_initial=0.01)
    try:
        sink.offer(ng_event(1))
        sink.offer(ng_event(2))
        assert wait_for(lambda: sink.pending == 0)
    finally:
        sink.close()
        rx.close()
    assert sink.rejected == 1 and [r["frame"] for r in rx.delivered] == [2]


def test_memory_outbox_without_a_folder():
    rx = Receiver(plan=lambda n: 500 if n % 2 else 204)
    sink = WebhookSink(rx.url, backoff_initial=0.01, backoff_max=0.02)
    try:
        for i in range(5):
            sink.offer(ng_event(i))
        assert wait_for(lambda: sink.pending == 0)
    finally:
        sink.close()
        rx.close()
    assert [r["frame"] for r in rx.delivered] == list(range(5))


@pytest.mark.parametrize("url", ["ftp://x/y", "127.0.0.1:9000/ng"])
def test_bad_url_is_an_output_error(url):
    from edgestad.runtime.errors import OutputError

    with pytest.raises(OutputError, match="http"):
        WebhookSink(url)
