"""Service behaviour with real processes and sockets: sd_notify on a real Unix datagram socket,
the watchdog, SIGTERM flushing, and the systemd unit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgestad.runtime.cli import service
from edgestad.runtime.notify import SystemdNotifier, WatchdogFeeder, watchdog_interval_s
from edgestad.runtime.service import UnitOptions, install_unit, unit_text
from test_runtime_toy import make_toy_bundle, write_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    yield sock, str(path)
    sock.close()


def drain(sock, seconds: float) -> list[str]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    return out


def test_notifier_speaks_the_protocol(notify_socket):
    sock, path = notify_socket
    n = SystemdNotifier(path)
    assert n.ready("up\nand running") and n.watchdog() and n.stopping()
    msgs = drain(sock, 0.2)
    assert msgs == ["READY=1\nSTATUS=up and running", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]
    assert not SystemdNotifier("").enabled and SystemdNotifier("").ready() is False  # outside systemd: no-op


def test_notifier_abstract_namespace():
    name = f"edgestad-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(1)
    try:
        assert SystemdNotifier("@" + name).status("hello")
        assert sock.recv(100) == b"STATUS=hello"
    finally:
        sock.close()


def test_watchdog_fed_only_while_frames_flow(notify_socket):
    sock, path = notify_socket
    feeder = WatchdogFeeder(SystemdNotifier(path), period_s=0.02, stale_after_s=0.06).start()
    try:
        assert drain(sock, 0.15) == []  # no frame yet: not fed
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            feeder.frame_done()
            time.sleep(0.005)
        fed = drain(sock, 0.01)
        assert len(fed) >= 5 and set(fed) == {"WATCHDOG=1"}
        drain(sock, 0.1)  # frames stop: within stale_after the pings stop too
        assert drain(sock, 0.2) == []
    finally:
        feeder.stop()


def test_watchdog_interval_from_environment():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not us
    assert watchdog_interval_s({}) is None


def _start_runtime(tmp_path, extra_env=None, *args):
    bundle = make_toy_bundle(tmp_path / "bundle", 32, 32)
    video = write_video(tmp_path / "v.avi", 15)
    # A stream URL that ends is reconnected forever: a source that never finishes on its own.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "edgestad.runtime.cli", "run", str(bundle), "--url", str(video),
           "--reconnect-initial", "0.01", "--reconnect-max", "0.02", "--events", str(tmp_path / "ev"), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_finishes_flushes_and_exits_zero(tmp_path, notify_socket):
    sock, path = notify_socket
    proc = _start_runtime(tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    events = tmp_path / "ev" / "events.jsonl"
    try:
        # several reconnects (= the stream ended several times) and NG events written
        assert _wait_for(lambda: events.is_file() and events.read_text().count('"source_reconnected"') >= 3)
        msgs = drain(sock, 0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM: stopping capture" in err
    msgs += drain(sock, 0.2)
    assert msgs[0].startswith("READY=1") and "WATCHDOG=1" in msgs
    assert any(m.startswith("STOPPING=1") for m in msgs)
    lines = [json.loads(line) for line in events.read_text().splitlines()]  # every line complete JSON
    summary = json.loads(out.strip().splitlines()[-1])["summary"]
    assert lines[-1]["event"] == "stop" and lines[-1]["reason"] == "signal"
    assert sum(1 for e in lines if e["event"] == "ng") == summary["ng_count"] > 0
    assert summary["stopped_by_signal"] and summary["frames_processed"] + summary["frames_dropped"] == summary["frames_captured"]


def test_unit_has_the_service_contract():
    text = unit_text(UnitOptions(config=Path("/etc/edgestad/x.toml"), python="/usr/bin/python3",
                                 write_paths=("/data/ng",), csi_camera=True), devices=["/dev/video2"])
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure", "RestartSec=5",
                 "ProtectSystem=strict", "PrivateTmp=yes", "NoNewPrivileges=yes", "DevicePolicy=closed",
                 "DeviceAllow=char-video4linux rw", "DeviceAllow=/dev/nvmap rw", "DeviceAllow=/dev/nvidiactl rw",
                 "DeviceAllow=/dev/video2 rw", "SupplementaryGroups=video", "ReadWritePaths=/var/lib/edgestad /data/ng",
                 "BindPaths=/tmp/argus_socket",
                 "ExecStart=/usr/bin/python3 -m edgestad.runtime.cli run --config /etc/edgestad/x.toml"):
        assert line in text.splitlines(), line


def test_shipped_unit_is_the_generated_one():
    assert (REPO / "docker" / "edgestad.service").read_text() == unit_text(UnitOptions(python="/usr/bin/python3"), devices=[])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path):
    unit = tmp_path / "edgestad.service"
    unit.write_text(unit_text(UnitOptions(python=sys.executable, write_paths=(str(tmp_path),), csi_camera=True)))
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (p.stdout + p.stderr).splitlines() if str(unit) in line or "Unknown" in line]
    assert not complaints, complaints


def test_service_cli_install_and_print(tmp_path):
    cfg = tmp_path / "edgestad.toml"
    cfg.write_text(f'camera = 0\nevents = "{tmp_path / "ev"}"\nsave_ng = "ng"\n')
    runner = CliRunner()
    r = runner.invoke(service, ["install", "--config", str(cfg), "--unit-path", str(tmp_path / "u" / "edgestad.service")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "u" / "edgestad.service").read_text()
    assert f"ReadWritePaths=/var/lib/edgestad {tmp_path / 'ev'} {tmp_path / 'ng'}" in text
    assert "systemctl enable --now edgestad.service" in r.output
    r = runner.invoke(service, ["print-unit", "--config", str(cfg)])
    assert r.exit_code == 0 and "Type=notify" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("camra = 0\n")
    r = runner.invoke(service, ["install", "--config", str(bad), "--unit-path", str(tmp_path / "x.service")])
    assert r.exit_code == 2 and "unknown key 'camra'" in r.output


def test_install_unit_is_atomic_replace(tmp_path):
    target = tmp_path / "edgestad.service"
    target.write_text("old")
    install_unit("new\n", target)
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["edgestad.service"]
