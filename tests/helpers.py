"""Small helpers the runtime tests share: a paced test camera, a webhook receiver, a free loopback
port and polling until a condition holds."""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edgestad.runtime.sources import Frame, Source


class PacedCamera(Source):
    """A live source without a camera: frame i is ``make(i)`` (BGR uint8), one every ``period`` s."""

    live = True

    def __init__(self, make, period: float, description: str = "test camera"):
        self.make, self.period, self.description = make, period, description
        self.i = 0

    def open(self):
        pass

    def read(self):
        time.sleep(self.period)
        self.i += 1
        return Frame(self.make(self.i), self.i, time.time(), time.monotonic())


class Receiver:
    """A real HTTP server on 127.0.0.1. ``plan(n)`` says what the n-th request (from 1) gets:
    an HTTP status code, or "drop" (the connection is closed without an answer)."""

    def __init__(self, plan=lambda n: 204, port: int = 0):
        self.plan = plan
        self.requests = 0
        self.times: list[float] = []
        self.delivered: list[dict] = []  # records answered with 2xx
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                record = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    outer.times.append(time.monotonic())
                    what = outer.plan(outer.requests)
                if what == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if 200 <= what < 300:
                    with outer.lock:
                        outer.delivered.append(record)
                self.send_response(what)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/ng"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 20.0) -> bool:
    """Poll ``pred`` every 20 ms until it is true or ``timeout`` seconds pass; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


# ------------------------------------------------------------------ headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

CHROMIUM_MISSING = ("headless Chromium test needs the chromium and chromedriver binaries "
                    "(Debian: chromium, chromium-driver; bash scripts/install_services.sh installs them)")


class WebDriver:
    """The few W3C WebDriver commands the test needs, over chromedriver's loopback HTTP port."""

    def __init__(self, tmp_path, window: str = "1280,720"):
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
                "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                f"--window-size={window}"]},
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
