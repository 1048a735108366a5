"""CLI behaviour with real processes: an unusable video file, the config checker, and the service
unit that `print-unit` and `install` produce."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgestad.runtime.cli import service, webhook_outbox_dir
from edgestad.runtime.config import build_config
from edgestad.runtime.errors import EXIT_CONFIG, EXIT_SOURCE
from helpers import wait_for
from test_runtime_toy import make_toy_bundle, write_video


def _run(*args, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "edgestad.runtime.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("content", [b"this is a text file, not a video\n" * 20, b""])
def test_run_on_a_file_that_is_not_a_video_exits_3_naming_it(tmp_path, content):
    bundle = make_toy_bundle(tmp_path / "bundle", 32, 32)
    bad = tmp_path / "notes.avi"
    bad.write_bytes(content)
    p = _run(bundle, "--video", bad, "--events", tmp_path / "ev")
    assert p.returncode == EXIT_SOURCE, (p.stdout, p.stderr)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0], p.stderr
    assert '"summary"' not in p.stdout  # no "0 frames processed" success summary


def test_run_on_a_real_video_still_processes_every_frame(tmp_path):
    bundle = make_toy_bundle(tmp_path / "bundle", 32, 32)
    video = write_video(tmp_path / "v.avi", 7)
    p = _run(bundle, "--video", video)
    assert p.returncode == 0, p.stderr
    assert '"frames_processed": 7' in p.stdout


def _check(path):
    return subprocess.run([sys.executable, "-m", "edgestad.runtime.config", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_config_checker_rejects_two_sources_like_run(tmp_path):
    cfg = tmp_path / "two.toml"
    cfg.write_text('camera = 0\nvideo = "/data/line1.mp4"\n')
    p = _check(cfg)
    assert p.returncode == EXIT_CONFIG
    assert "more than one source given (camera, video)" in p.stderr and str(cfg) in p.stderr
    r = _run("--config", cfg, "--max-frames", "1")  # run refuses it with the same message and code
    assert r.returncode == EXIT_CONFIG and "more than one source given (camera, video)" in r.stderr
    # a source on the command line replaces the file's, as before
    assert build_config(cfg, {"folder": "/x"}).source() == ("folder", "/x")
    good = tmp_path / "good.toml"
    good.write_text("camera = 0\n")
    assert _check(good).returncode == 0


def _write_config(tmp_path) -> Path:
    cfg = tmp_path / "edgestad.toml"
    cfg.write_text(f'camera = 0\nevents = "{tmp_path / "ev"}"\nsave_ng = "ng"\nwebhook = "http://127.0.0.1:9/x"\n'
                   f'webhook_outbox = "/srv/outbox"\n')
    return cfg


def test_print_unit_and_install_write_the_identical_unit(tmp_path):
    cfg = _write_config(tmp_path)
    runner = CliRunner()
    args = ["--config", str(cfg), "--write-path", "/data/extra", "--python", "/usr/bin/python3"]
    printed = runner.invoke(service, ["print-unit", *args])
    assert printed.exit_code == 0, printed.output
    unit = tmp_path / "u" / "edgestad.service"
    installed = runner.invoke(service, ["install", *args, "--unit-path", str(unit)])
    assert installed.exit_code == 0, installed.output
    assert printed.stdout == unit.read_text()
    rw = next(line for line in unit.read_text().splitlines() if line.startswith("ReadWritePaths="))
    assert rw == f"ReadWritePaths=/var/lib/edgestad /data/extra {tmp_path / 'ev'} {tmp_path / 'ng'} /srv/outbox"


def test_install_next_steps_never_overwrite_the_given_config(tmp_path):
    cfg = _write_config(tmp_path)
    runner = CliRunner()
    r = runner.invoke(service, ["install", "--config", str(cfg), "--unit-path", str(tmp_path / "x.service")])
    assert r.exit_code == 0, r.output
    assert f"> {cfg}" not in r.output and "--example" not in r.output
    assert f"-m edgestad.runtime.config {cfg}" in r.output  # check it instead
    missing = tmp_path / "new" / "edgestad.toml"
    r = runner.invoke(service, ["install", "--config", str(missing), "--unit-path", str(tmp_path / "y.service")])
    assert r.exit_code == 0 and f"--example > {missing}" in r.stdout  # only a config that does not exist yet


def test_webhook_outbox_defaults_next_to_the_events(tmp_path):
    assert webhook_outbox_dir(build_config(None, {"camera": "0", "events": "/ev", "webhook": "http://h/x"})) \
        == str(Path("/ev") / "webhook-outbox")
    assert webhook_outbox_dir(build_config(None, {"camera": "0", "webhook_outbox": "/o"})) == "/o"
    assert webhook_outbox_dir(build_config(None, {"camera": "0"})) is None


def _start_run(tmp_path, *args):
    bundle = make_toy_bundle(tmp_path / "bundle", 32, 32)
    video = write_video(tmp_path / "v.avi", 15)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A stream URL that ends is reconnected forever: a source that runs until SIGTERM.
    cmd = [sys.executable, "-m", "edgestad.runtime.cli", "run", str(bundle), "--url", str(video),
           "--reconnect-initial", "0.01", "--reconnect-max", "0.02", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stop(proc):
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_run_http_limits_come_from_the_options(tmp_path):
    import http.client
    import re
    import time

    proc = _start_run(tmp_path, "--http", "127.0.0.1:0", "--http-read-timeout", "0.5", "--http-max-clients", "1")
    try:
        line = ""
        end = time.monotonic() + 60
        while "operator page on" not in line and time.monotonic() < end:
            line = proc.stderr.readline()
        port = int(re.search(r"operator page on http://127\.0\.0\.1:(\d+)", line).group(1))

        def stream():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/stream.mjpg")
            return c, c.getresponse()

        held, r = stream()
        assert r.status == 200
        extra, r2 = stream()                       # the one stream slot is taken
        assert r2.status == 503
        r2.close()
        extra.close()
        assert _status_ok(port)                    # the page and the API are not streams
        r.close()
        held.close()
        keep = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        keep.request("GET", "/status")
        assert keep.getresponse().read()
        t0 = time.monotonic()
        assert keep.sock.recv(1) == b"" and time.monotonic() - t0 < 3  # closed after 0.5 s of silence
        keep.close()
    finally:
        out, err = _stop(proc)
    assert proc.returncode == 0, err


def _status_ok(port):
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_webhook_outbox_survives_a_restart_of_the_runtime_process(tmp_path):
    import json

    from helpers import Receiver, free_port

    port = free_port()   # nothing listens there yet
    events = tmp_path / "ev"
    outbox = events / "webhook-outbox"
    proc = _start_run(tmp_path, "--events", events, "--webhook", f"http://127.0.0.1:{port}/ng")
    try:
        assert wait_for(lambda: outbox.is_dir() and len(list(outbox.glob("*.json"))) >= 5, timeout=30.0)
    finally:
        _, err = _stop(proc)
    assert proc.returncode == 0, err
    waiting = {json.loads(p.read_text())["time"] for p in outbox.glob("*.json")}
    logged = [json.loads(line) for line in (events / "events.jsonl").read_text().splitlines()]
    assert waiting == {e["time"] for e in logged if e["event"] == "ng"}  # every NG event is waiting

    hook = Receiver(port=port)
    try:
        proc = _start_run(tmp_path, "--events", events, "--webhook", hook.url)
        try:
            assert wait_for(lambda: waiting <= {r["time"] for r in hook.delivered}, timeout=30.0)
        finally:
            _, err = _stop(proc)
        assert proc.returncode == 0, err
    finally:
        hook.close()
    assert not list(outbox.glob("*.json"))  # all delivered, the new run's events too
