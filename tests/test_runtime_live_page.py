"""The live page at ``/`` in real headless Chromium, driven through chromedriver's W3C WebDriver
protocol (plain HTTP on loopback, no extra Python package): the overlay stream renders and the
OK/NG counters follow the running pipeline."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

from edgestad.bundle import load_bundle
from edgestad.runtime.backends import select_backend
from edgestad.runtime.http import OverlayFeed, RuntimeHttpServer
from edgestad.runtime.pipeline import Pipeline
from edgestad.runtime.preprocess import InputSpec, Preprocessor
from edgestad.runtime.results import Thresholds
from edgestad.runtime.sources import SourceSpec
from test_runtime_http import SlowCamera
from test_runtime_toy import make_toy_bundle
from helpers import free_port  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium test needs the chromium and chromedriver binaries "
           "(Debian: chromium, chromium-driver; bash scripts/install_services.sh installs them)",
)


class WebDriver:
    """The few W3C WebDriver commands the test needs, over chromedriver's loopback HTTP port."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + 20
        while True:
            try:
                self._call("GET", "/status")
                break
            except OSError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise RuntimeError("chromedriver did not start")
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "eager",  # the MJPEG stream never finishes loading
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=800,700"]},
        }}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None, timeout=60):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"webdriver {method} {path}: {exc.read()[:500]!r}") from None

    def get(self, url):
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script):
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": []})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))

    def quit(self):
        try:
            self._call("DELETE", f"/session/{self.session}", timeout=20)
        except Exception:  # noqa: BLE001
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


STATE = """const img = document.getElementById('stream');
return {w: img.naturalWidth, h: img.naturalHeight, ok: document.getElementById('ok').textContent,
        ng: document.getElementById('ng').textContent};"""


def test_live_page_renders_the_stream_and_updates_the_counters(tmp_path):
    bundle = load_bundle(make_toy_bundle(tmp_path / "b", 48, 64))
    thr = Thresholds.from_manifest(bundle.manifest)
    feed = OverlayFeed(thr, max_fps=10)
    pipe = Pipeline(SourceSpec("camera", "7"), select_backend(bundle.path, bundle.manifest, "onnxruntime"),
                    Preprocessor(InputSpec.from_manifest(bundle.manifest)), thr, [feed], source_factory=SlowCamera)
    server = RuntimeHttpServer("127.0.0.1", 0, pipe.snapshot, feed).start()
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    driver = None
    try:
        driver = WebDriver(tmp_path)
        driver.get(server.url + "/")
        states = []
        end = time.monotonic() + 30
        while time.monotonic() < end:
            s = driver.js(STATE)
            if s["w"] > 0 and s["ok"].isdigit() and s["ng"].isdigit():
                states.append(s)
                if len(states) >= 2 and int(s["ok"]) > int(states[0]["ok"]) and int(s["ng"]) > int(states[0]["ng"]):
                    break
            time.sleep(0.5)
        (tmp_path / "page.png").write_bytes(driver.screenshot())
    finally:
        if driver is not None:
            driver.quit()
        pipe.stop()
        runner.join(10)
        server.close()
    assert states, "the stream image never rendered or the counters never filled in"
    first, last = states[0], states[-1]
    assert (first["w"], first["h"]) == (160, 120)  # the overlay frame's natural size
    assert int(last["ok"]) > int(first["ok"]) and int(last["ng"]) > int(first["ng"]), (first, last)
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
