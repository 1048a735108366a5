"""The MQTT sink against a real Mosquitto broker (started by the fixture on a free loopback port
with a temporary config), including a broker restart in the middle of a run, checked with a real
subscriber client."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto binary not installed "
                                                          "(bash scripts/install_services.sh installs it)")
mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (pip install -e '.[dev]')")

from edgestad.runtime.sinks import MqttSink  # noqa: E402
from helpers import free_port, wait_for  # noqa: E402


class Broker:
    """A real mosquitto process; persistence keeps the subscriber's session across a restart."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {folder}/\n"
            "max_queued_messages 100000\n"
            # running as root, mosquitto would switch to the 'mosquitto' user, which cannot read
            # this temporary folder; as any other user this line changes nothing
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            "log_dest stderr\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()


class Subscriber:
    """A real client with a persistent session (clean_session=False, QoS 1): the broker keeps
    what arrives for it while it is reconnecting after the broker's restart."""

    def __init__(self, port: int, topic: str):
        self.frames: list[int] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{port}", clean_session=False)
        self.client.reconnect_delay_set(0.05, 0.2)

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe(topic, qos=1)

        def on_subscribe(client, userdata, mid, rcs, props=None):
            self.subscribed.set()

        def on_message(client, userdata, msg):
            self.frames.append(json.loads(msg.payload)["frame"])

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber did not subscribe"

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def ng(i: int) -> dict:
    return {"event": "ng", "frame": i, "is_ng": True}


def test_publishes_ng_events_to_a_real_broker(broker):
    sub = Subscriber(broker.port, "line1/ng")
    sink = MqttSink(f"127.0.0.1:{broker.port}/line1/ng")
    try:
        for i in range(20):
            sink._offer(ng(i))
        assert wait_for(lambda: len(sub.frames) == 20)
    finally:
        sink.close()
        sub.close()
    assert sub.frames == list(range(20)) and sink.sent == 20 and sink.failed == sink.dropped == 0


def test_a_full_queue_while_connected_waits_for_acknowledgements_instead_of_dropping(broker):
    """Right after a reconnect the queue is full of resent messages whose PUBACKs have not been
    processed yet; a message published then must wait for room, not be dropped."""
    bound = 5
    sub = Subscriber(broker.port, "line1/ng")
    sink = MqttSink(f"127.0.0.1:{broker.port}/line1/ng", queue_size=bound)
    try:
        assert wait_for(sink.client.is_connected, timeout=10)
        held = threading.Event()
        original = sink.client._handle_pubackcomp

        def slow_ack(*args, **kwargs):  # PUBACKs processed late, as under heavy CPU load
            held.wait(0.3)
            return original(*args, **kwargs)

        sink.client._handle_pubackcomp = slow_ack
        for i in range(3 * bound):  # three times the bound, all while connected
            sink._offer(ng(i))
        assert wait_for(lambda: sink.sent + sink.dropped == 3 * bound, timeout=60)
        assert wait_for(lambda: len(set(sub.frames)) == 3 * bound, timeout=30), sorted(set(sub.frames))
    finally:
        sink.close()
        sub.close()
    assert sink.dropped == 0 and sink.sent == 3 * bound


def test_broker_restart_mid_run_delivers_the_queue_up_to_its_bound(broker):
    bound = 40
    sub = Subscriber(broker.port, "line1/ng")
    sink = MqttSink(f"127.0.0.1:{broker.port}/line1/ng", queue_size=bound, reconnect_min=0.1, reconnect_max=0.5)
    try:
        for i in range(10):
            sink._offer(ng(i))
        assert wait_for(lambda: len(sub.frames) == 10 and sink.unacked == 0)

        broker.stop()
        assert wait_for(lambda: not sink.client.is_connected(), timeout=10)
        for i in range(10, 10 + bound):  # exactly the bound: all of them are kept
            sink._offer(ng(i))
        assert wait_for(lambda: sink.sent == 10 + bound)
        for i in range(10 + bound, 10 + bound + 15):  # beyond the bound: dropped and counted
            sink._offer(ng(i))
        assert wait_for(lambda: sink.dropped == 15)
        time.sleep(1.0)  # down for a while; the client keeps trying to reconnect

        broker.start()
        assert wait_for(lambda: len(set(sub.frames)) >= 10 + bound, timeout=30), len(set(sub.frames))
        # The subscriber can see the resent backlog before the sink has processed the broker's
        # PUBACKs for it (under CPU load, many of them): the sink waits for room then instead
        # of dropping (it once dropped message 100 here), and nothing more is dropped.
        for i in range(100, 105):  # and the run goes on after the reconnect
            sink._offer(ng(i))
        assert wait_for(lambda: {100, 101, 102, 103, 104} <= set(sub.frames), timeout=60), \
            (sorted(set(sub.frames) - set(range(10 + bound))), sink.dropped, sink.unacked)
        assert wait_for(lambda: sink.unacked == 0, timeout=30)
    finally:
        sink.close()
        sub.close()
    got = set(sub.frames)
    assert got == set(range(10 + bound)) | set(range(100, 105))  # nothing below the bound lost
    assert sink.dropped == 15 and sink.failed == 0
