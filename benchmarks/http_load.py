"""Load and limits benchmark of the runtime's HTTP server, against the real server on 127.0.0.1.

The server runs in its own process (this file with ``--serve``): a real Pipeline on a toy graph
fed by a synthetic 30 fps camera, and a real RuntimeHttpServer with the given limits, so its RSS
and thread count are measured from /proc without the load generator's own memory mixed in.

1. load: ``--clients`` concurrent clients (default 50: 45 polling /status, /metrics, / and HEAD on
   keep-alive connections, 5 watching /stream.mjpg) for ``--seconds`` (default 60) after a
   ``--warmup``. Pass: no request timed out (client timeout 10 s), no error, and the server's RSS
   stays within 10 % of its value at the end of the warm-up.
2. idle: ``--idle`` (default 100) connections opened and left silent. Pass: the server closes
   every one after its read timeout (``--read-timeout``, shortened from the 30 s default) and its
   thread count returns to the baseline.
3. overflow: ``--max-clients`` connections held open, then 20 more requests. Pass: each gets
   HTTP 503 at once, and the server starts no thread for them.

All traffic goes to 127.0.0.1; every loop is bounded in time. Takes about 2 minutes.

    python benchmarks/http_load.py            # writes benchmarks/results/http_load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the toy bundle helpers live with the tests

CLIENT_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- server process


def serve(args) -> None:
    import numpy as np

    from edgestad.bundle import load_bundle
    from edgestad.runtime.backends import select_backend
    from edgestad.runtime.http import OverlayFeed, RuntimeHttpServer
    from edgestad.runtime.pipeline import Pipeline
    from edgestad.runtime.preprocess import InputSpec, Preprocessor
    from edgestad.runtime.results import Thresholds
    from edgestad.runtime.sources import Frame, Source, SourceSpec
    from test_runtime_toy import frame_with_spot, make_toy_bundle

    class Camera(Source):
        """30 fps, 320x240, every 4th frame with a bright 'defect'."""

        live = True
        description = "synthetic camera"

        def __init__(self):
            self.i = 0
            self.next_t = time.monotonic()
            self.frames = [frame_with_spot(i, 320, 240, spot=i % 4 == 0) for i in range(8)]

        def open(self):
            pass

        def read(self):
            self.next_t += 1 / 30
            delay = self.next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.i += 1
            return Frame(np.array(self.frames[self.i % 8]), self.i, time.time(), time.monotonic())

    with tempfile.TemporaryDirectory(prefix="edgestad-http-load-") as tmp:
        bundle = load_bundle(make_toy_bundle(Path(tmp) / "bundle", 128, 128))
        thr = Thresholds.from_manifest(bundle.manifest)
        feed = OverlayFeed(thr, max_fps=10)
        pipe = Pipeline(SourceSpec("camera", "0"), select_backend(bundle.path, bundle.manifest, "onnxruntime",
                                                                  intra_op_threads=1),
                        Preprocessor(InputSpec.from_manifest(bundle.manifest)), thr, [feed], source_factory=Camera)
        server = RuntimeHttpServer("127.0.0.1", 0, pipe.snapshot, feed, read_timeout_s=args.read_timeout,
                                   max_clients=args.max_clients).start()
        signal.signal(signal.SIGTERM, lambda *a: pipe.stop(by_signal=True))
        print(f"READY {server.address[1]}", flush=True)
        try:
            pipe.run()
        finally:
            server.close()


# --------------------------------------------------------------------------- measurement helpers


def proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024.0
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


def wait_until(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def settled_threads(pid: int, seconds: float = 15.0) -> int:
    """The server's thread count once it stopped changing (connection threads have ended)."""
    last, stable_since = proc_status(pid)["threads"], time.monotonic()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.1)
        now = proc_status(pid)["threads"]
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            break
    return last


def pct(values, q):
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


# --------------------------------------------------------------------------- phase 1: load


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.timeouts = 0
        self.errors: list[str] = []
        self.bad_status: dict[int, int] = {}
        self.latency_ms: list[float] = []
        self.stream_frames = 0
        self.counting = False

    def add(self, ms: float) -> None:
        with self.lock:
            if self.counting:
                self.requests += 1
                self.latency_ms.append(ms)


def poller(port: int, stop: threading.Event, stats: Stats, k: int) -> None:
    paths = [("GET", "/status"), ("GET", "/metrics"), ("GET", "/"), ("HEAD", "/status")]
    i = k
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
        try:
            for _ in range(20):  # 20 requests per keep-alive connection, then a new connection
                if stop.is_set():
                    break
                method, path = paths[i % len(paths)]
                i += 1
                t0 = time.monotonic()
                conn.request(method, path)
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    with stats.lock:
                        stats.bad_status[r.status] = stats.bad_status.get(r.status, 0) + 1
                stats.add((time.monotonic() - t0) * 1000)
                time.sleep(0.02)
        except socket.timeout:
            with stats.lock:
                stats.timeouts += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with stats.lock:
                stats.errors.append(repr(exc)[:200])
        finally:
            conn.close()


def viewer(port: int, stop: threading.Event, stats: Stats) -> None:
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
        try:
            conn.request("GET", "/stream.mjpg")
            r = conn.getresponse()
            if r.status != 200:
                with stats.lock:
                    stats.bad_status[r.status] = stats.bad_status.get(r.status, 0) + 1
                time.sleep(0.5)
                continue
            t0 = time.monotonic()
            while not stop.is_set():
                r.readline()  # boundary
                length = 0
                while line := r.readline().strip():
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if not length:
                    raise OSError("stream part without Content-Length")
                r.read(length)
                r.readline()
                with stats.lock:
                    if stats.counting:
                        stats.stream_frames += 1
                stats.add((time.monotonic() - t0) * 1000)
                t0 = time.monotonic()
        except socket.timeout:
            with stats.lock:
                stats.timeouts += 1
        except Exception as exc:  # noqa: BLE001
            if not stop.is_set():
                with stats.lock:
                    stats.errors.append(repr(exc)[:200])
        finally:
            conn.close()


def phase_load(pid: int, port: int, clients: int, viewers: int, warmup: float, seconds: float) -> dict:
    stats, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=poller, args=(port, stop, stats, k), daemon=True) for k in range(clients - viewers)]
    threads += [threading.Thread(target=viewer, args=(port, stop, stats), daemon=True) for _ in range(viewers)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    with stats.lock:
        stats.counting = True
    start = proc_status(pid)
    samples = [start]
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        time.sleep(1.0)
        samples.append(proc_status(pid))
    with stats.lock:
        stats.counting = False
    stop.set()
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 5)
    rss = [s["rss_mib"] for s in samples]
    growth = max(rss) / rss[0] - 1
    return {
        "clients": clients, "stream_viewers": viewers, "warmup_s": warmup, "seconds": seconds,
        "client_timeout_s": CLIENT_TIMEOUT_S,
        "requests": stats.requests, "requests_per_s": round(stats.requests / seconds, 1),
        "stream_frames": stats.stream_frames,
        "timeouts": stats.timeouts, "errors": len(stats.errors), "error_examples": stats.errors[:5],
        "non_200": stats.bad_status,
        "latency_ms": {"p50": pct(stats.latency_ms, 0.5), "p99": pct(stats.latency_ms, 0.99),
                       "max": round(max(stats.latency_ms), 2) if stats.latency_ms else None},
        "server_rss_mib": {"start": round(rss[0], 1), "end": round(rss[-1], 1), "max": round(max(rss), 1),
                           "min": round(min(rss), 1), "median": round(statistics.median(rss), 1)},
        "server_rss_growth_max": round(growth, 4),
        "server_threads_max": max(s["threads"] for s in samples),
        "pass": stats.timeouts == 0 and not stats.errors and not stats.bad_status and growth <= 0.10
                and stats.requests > 0,
    }


# --------------------------------------------------------------------------- phase 2: idle


def phase_idle(pid: int, port: int, n: int, read_timeout: float) -> dict:
    baseline = settled_threads(pid)
    t_open = time.monotonic()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    accepted = wait_until(lambda: proc_status(pid)["threads"] >= baseline + n, timeout=10)
    peak = proc_status(pid)["threads"]
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed_at: dict[int, float] = {}
    deadline = t_open + read_timeout + 20
    while len(closed_at) < n and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(1)
            except OSError:
                data = b""
            if data == b"":
                closed_at[s.fileno()] = time.monotonic() - t_open
                sel.unregister(s)
    freed = wait_until(lambda: proc_status(pid)["threads"] <= baseline, timeout=10)
    after = proc_status(pid)["threads"]
    for s in socks:
        s.close()
    times = sorted(closed_at.values())
    return {
        "connections": n, "read_timeout_s": read_timeout, "all_accepted": accepted,
        "server_threads": {"baseline": baseline, "peak": peak, "after": after},
        "closed_by_server": len(closed_at),
        "closed_after_s": {"min": round(times[0], 2), "max": round(times[-1], 2)} if times else None,
        "pass": accepted and len(closed_at) == n and freed and times[0] >= read_timeout * 0.9
                and times[-1] <= read_timeout + 10,
    }


# --------------------------------------------------------------------------- phase 3: overflow


def phase_overflow(pid: int, port: int, max_clients: int, extra: int = 20) -> dict:
    baseline = settled_threads(pid)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(max_clients)]
    full = wait_until(lambda: proc_status(pid)["threads"] >= baseline + max_clients, timeout=10)
    codes, ms = [], []
    for _ in range(extra):
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
        try:
            conn.request("GET", "/status")
            r = conn.getresponse()
            r.read()
            codes.append(r.status)
        except Exception as exc:  # noqa: BLE001
            codes.append(repr(exc)[:80])
        finally:
            conn.close()
        ms.append((time.monotonic() - t0) * 1000)
    peak = proc_status(pid)["threads"]
    for s in held:
        s.close()
    freed = wait_until(lambda: proc_status(pid)["threads"] <= baseline, timeout=15)
    return {
        "max_clients": max_clients, "held": max_clients, "extra_requests": extra,
        "answers": {str(c): codes.count(c) for c in set(codes)},
        "answer_ms": {"p50": pct(ms, 0.5), "max": round(max(ms), 2)},
        "server_threads": {"baseline": baseline, "peak": peak},
        "pass": full and codes.count(503) == extra and peak <= baseline + max_clients and freed,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--viewers", type=int, default=5, help="of the clients, how many watch the MJPEG stream")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--read-timeout", type=float, default=5.0, help="server read timeout (default 30 s shortened)")
    ap.add_argument("--max-clients", type=int, default=128)
    ap.add_argument("--out", default=str(HERE / "results" / "http_load.json"))
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return
    if args.max_clients < max(args.clients, args.idle):
        ap.error("--max-clients must be >= --clients and --idle")

    cmd = [sys.executable, __file__, "--serve", "--read-timeout", str(args.read_timeout),
           "--max-clients", str(args.max_clients)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("READY "):
            raise SystemExit(f"server did not start: {line!r}")
        port = int(line.split()[1])
        print(f"server pid {server.pid} on 127.0.0.1:{port}", flush=True)
        load = phase_load(server.pid, port, args.clients, args.viewers, args.warmup, args.seconds)
        print("load:", json.dumps(load), flush=True)
        idle = phase_idle(server.pid, port, args.idle, args.read_timeout)
        print("idle:", json.dumps(idle), flush=True)
        overflow = phase_overflow(server.pid, port, args.max_clients)
        print("overflow:", json.dumps(overflow), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    result = {
        "benchmark": "http_load",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "server": {"read_timeout_s": args.read_timeout, "max_clients": args.max_clients,
                   "pipeline": "toy graph 128x128, synthetic camera 30 fps 320x240, MJPEG cap 10 fps"},
        "load": load, "idle": idle, "overflow": overflow,
        "pass": load["pass"] and idle["pass"] and overflow["pass"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"pass={result['pass']}; wrote {args.out}")
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
