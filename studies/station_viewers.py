"""What watching the operator page costs the runtime: throughput with no HTTP server, with the
server and nobody watching, and with five viewers on the page.

Goal (the issue): with five viewers on the page the runtime's throughput drops by at most 5 %
against none; with none, the page costs nothing.

How. The runtime runs in its own process (``studies/http_load.py --serve``), as
``edgestad run`` builds it: a real Pipeline (ONNX Runtime, a toy graph with four 3x3 conv layers
at 160x160 so inference dominates the frame time) pulling 640x480 synthetic frames as fast as it
can (a source that is not live, like a video file: nothing dropped, so frames processed per
second is the throughput), the NG store (``--save-ng``; one frame in 250 is NG) and, with the
page on, the operator station and the real RuntimeHttpServer. The station's recent-scores store
is pre-filled (50,000 parts, its cap) so the page's trend costs what it costs on a line that has
run for a while. The child prints its frame counter four times a second on stdout; no HTTP
request is needed to measure it.

Phases, each ``--seconds`` long (default 30) after a warm-up:
  a  no HTTP server at all (``edgestad run`` without ``--http``: no station, no stream feed);
  b  the page on (station + server), nobody watching;
  c  the page on, five viewers, each what ``runtime/static/station.js`` does in a browser: the page
     and its assets once, one ``/api/live`` event stream, one ``/stream.mjpg`` (overlay), and
     ``/api/scores?minutes=10`` every 2 s, ``/api/health`` every 5 s, ``/api/gallery`` (and the
     new thumbnails) whenever the live state says a new part was flagged. Viewers are threads of
     this process, each from its own loopback address (127.0.0.11..15) as five tablets would be.
Order per cycle a, b, c, b, a (a in two fresh processes, b c b in one), ``--cycles`` times
(default 2), so slow drift of a shared machine hits all three alike. Throughput = frames
processed / time per segment; the phase's value is the mean of its segments, and its noise the
spread of the segments.

Pass: b >= 95 % of a (and the b-a difference is reported with its noise: "costs nothing" means
it is within the noise); c >= 95 % of b.

Note the viewers' own CPU (this process) runs on the same machine and is counted against the
runtime here; on a line the tablets are other machines. It is reported per phase.

    python studies/station_viewers.py    # about 6 minutes; writes studies/results/station_viewers.json
    python studies/station_viewers.py --seconds 10 --cycles 1   # a quick look, about 1.5 minutes
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from http_load import (CPU_NOTE, criteria_rows, DISTURBED_CORES, HOST, TOY, CpuMeter, ServerProcess, finish,  # noqa: E402
                       loadavg, machine_info, make_bundle, pct, proc_status, read_mjpeg)

PAGE_ASSETS = ("/", "/static/station.css", "/static/station.js", "/api/me")


# --------------------------------------------------------------------------- a viewer


class Viewer:
    """One browser on the operator page (what station.js does), from its own loopback address."""

    def __init__(self, port: int, k: int):
        self.port, self.k = port, k
        self.addr = f"127.0.0.{11 + k}"
        self.stop = threading.Event()
        self.events: list[float] = []
        self.parts: list[tuple[float, int]] = []
        self.polls: dict[str, list[tuple[float, float, bool]]] = {}   # kind -> (t, ms, ok)
        self.errors: list[tuple[float, str]] = []
        self.flagged_seq = None
        self.last_event = time.monotonic()
        self.thumbs_seen: set[str] = set()
        self._conns: list[http.client.HTTPConnection] = []
        self._threads: list[threading.Thread] = []

    def _conn(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        c = http.client.HTTPConnection(HOST, self.port, timeout=timeout, source_address=(self.addr, 0))
        self._conns.append(c)
        return c

    def _get(self, conn: http.client.HTTPConnection, kind: str, path: str) -> bytes | None:
        t0 = time.monotonic()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            ok = r.status == 200
            if not ok:
                self.errors.append((t0, f"{path}: HTTP {r.status}"))
        except Exception as exc:  # noqa: BLE001 - counted; the browser would retry on its next tick
            conn.close()
            body, ok = None, False
            if not self.stop.is_set():
                self.errors.append((t0, f"{path}: {exc!r}"[:160]))
        self.polls.setdefault(kind, []).append((t0, (time.monotonic() - t0) * 1000.0, ok))
        return body if ok else None

    def start(self) -> None:
        page = self._conn()
        for path in PAGE_ASSETS:
            self._get(page, "page", path)
        page.close()
        for target in (self._live, self._stream, self._poll):
            t = threading.Thread(target=target, daemon=True, name=f"viewer{self.k}{target.__name__}")
            t.start()
            self._threads.append(t)

    def _live(self) -> None:
        while not self.stop.is_set():
            conn = self._conn()
            try:
                conn.request("GET", "/api/live")
                r = conn.getresponse()
                if r.status != 200:
                    raise ConnectionError(f"HTTP {r.status}")
                while not self.stop.is_set():
                    line = r.readline()
                    if not line:
                        raise ConnectionError("event stream ended")
                    if line.startswith(b"data: "):
                        state = json.loads(line[6:])
                        self.last_event = time.monotonic()
                        self.events.append(self.last_event)
                        self.flagged_seq = state.get("flagged_seq")
            except Exception as exc:  # noqa: BLE001
                if not self.stop.is_set():
                    self.errors.append((time.monotonic(), f"/api/live: {exc!r}"[:160]))
                    self.stop.wait(1.0)   # the page's EventSource retries after 1 s
            finally:
                conn.close()

    def _stream(self) -> None:
        while not self.stop.is_set():
            conn = self._conn()
            try:
                read_mjpeg(conn, "/stream.mjpg?overlay=1", self.stop, lambda t, n: self.parts.append((t, n)))
            except Exception as exc:  # noqa: BLE001
                if not self.stop.is_set():
                    self.errors.append((time.monotonic(), f"/stream.mjpg: {exc!r}"[:160]))
                    self.stop.wait(1.0)
            finally:
                conn.close()

    def _poll(self) -> None:
        conn = self._conn()   # one keep-alive connection for the page's fetches
        now = time.monotonic()
        next_scores, next_health, next_check = now, now, now + 1.0
        gallery_seq = object()
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_scores:
                self._get(conn, "scores", "/api/scores?minutes=10")
                next_scores += 2.0
            if now >= next_health:
                self._get(conn, "health", "/api/health")
                next_health += 5.0
            if self.flagged_seq != gallery_seq:
                gallery_seq = self.flagged_seq
                body = self._get(conn, "gallery", "/api/gallery?n=24")
                if body:
                    for item in json.loads(body).get("items", []):
                        if item["overlay"] not in self.thumbs_seen:   # the browser caches the rest
                            self.thumbs_seen.add(item["overlay"])
                            self._get(conn, "thumbnail", item["overlay"])
            if now >= next_check:   # the page polls /api/state if the event stream stalls > 3 s
                next_check += 1.0
                if now - self.last_event > 3.0:
                    self._get(conn, "state_fallback", "/api/state")
            self.stop.wait(0.05)
        conn.close()

    def close(self) -> None:
        self.stop.set()
        for c in self._conns:   # unblock readers waiting on a stream
            if c.sock is not None:
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(15)

    def summary(self, t0: float, t1: float) -> dict:
        dt = t1 - t0
        polls = {}
        for kind, recs in self.polls.items():
            r = [x for x in recs if t0 <= x[0] < t1]
            if kind == "page" or not r:
                continue
            ms = [x[1] for x in r]
            polls[kind] = {"n": len(r), "failed": sum(1 for x in r if not x[2]), "ms_p50": pct(ms, 0.5),
                           "ms_p99": pct(ms, 0.99), "ms_max": round(max(ms), 1)}
        return {"events_per_s": round(sum(1 for t in self.events if t0 <= t < t1) / dt, 2),
                "parts_per_s": round(sum(1 for t, _ in self.parts if t0 <= t < t1) / dt, 2),
                "polls": polls, "errors": sum(1 for t, _ in self.errors if t0 <= t < t1),
                "error_examples": sorted({e for t, e in self.errors if t0 <= t < t1})[:3]}


def viewers_summary(viewers: list[Viewer], t0: float, t1: float) -> dict:
    per = [v.summary(t0, t1) for v in viewers]
    kinds = sorted({k for p in per for k in p["polls"]})
    return {
        "viewers": len(viewers),
        "events_per_s_each": [p["events_per_s"] for p in per],
        "parts_per_s_each": [p["parts_per_s"] for p in per],
        "requests": {k: {"n": sum(p["polls"].get(k, {}).get("n", 0) for p in per),
                         "failed": sum(p["polls"].get(k, {}).get("failed", 0) for p in per),
                         "ms_p50_max": max((p["polls"][k]["ms_p50"] for p in per if k in p["polls"]), default=None),
                         "ms_p99_max": max((p["polls"][k]["ms_p99"] for p in per if k in p["polls"]), default=None)}
                     for k in kinds},
        "errors": sum(p["errors"] for p in per),
        "error_examples": sorted({e for p in per for e in p["error_examples"]})[:5],
    }


# --------------------------------------------------------------------------- segments


def measure(phase: str, cycle: int, seconds: float, server: ServerProcess, viewers: list[Viewer] | None = None) -> dict:
    meter = CpuMeter(server)
    c0, tick0, t0, la0 = meter.sample(), server.last_tick(), time.monotonic(), loadavg()
    rss = []
    while time.monotonic() < t0 + seconds:
        time.sleep(min(1.0, max(0.0, t0 + seconds - time.monotonic())))
        rss.append(proc_status(server.pid).get("rss_mib", 0.0))
    t1, tick1, c1 = time.monotonic(), server.last_tick(), meter.sample()
    ticks = server.ticks_between(tick0[0], tick1[0])
    per_s = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(ticks[::4], ticks[4::4]) if b[0] > a[0]]
    dt = tick1[0] - tick0[0]
    seg = {"phase": phase, "cycle": cycle, "seconds": round(t1 - t0, 2),
           "fps": round((tick1[1] - tick0[1]) / dt, 2),
           "fps_1s_stdev": round(statistics.pstdev(per_s), 2) if per_s else None,
           "jpeg_encodes_per_s": round((tick1[3] - tick0[3]) / dt, 2),
           "server_rss_mib_max": round(max(rss), 1) if rss else None,
           "cpu_cores": CpuMeter.cores(c0, c1), "loadavg_start": la0, "loadavg_end": loadavg()}
    seg["disturbed"] = seg["cpu_cores"]["other"] > DISTURBED_CORES
    if viewers:
        seg["viewers"] = viewers_summary(viewers, t0, t1)
    print(f"cycle {cycle} {phase}: {seg['fps']} fps (server CPU {seg['cpu_cores']['server']}, "
          f"this process {seg['cpu_cores']['self']}, other {seg['cpu_cores']['other']}, load {seg['loadavg_end'][0]})"
          + (" DISTURBED" if seg["disturbed"] else ""), flush=True)
    return seg


def server_args(args, bundle: Path, ng_dir: Path, http: bool) -> list[str]:
    out = ["--bundle", str(bundle), "--fps", "0", "--frame-size", args.frame_size, "--spot-every", str(args.spot_every),
           "--save-ng", str(ng_dir), "--stream-fps", str(args.stream_fps), "--prefill-scores", str(args.prefill_scores)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out + ([] if http else ["--no-http"])


def run_cycle(args, bundle: Path, tmp: Path, cycle: int) -> list[dict]:
    segs = []

    def without_http(tag: str) -> None:
        srv = ServerProcess(server_args(args, bundle, tmp / f"ng{cycle}{tag}", http=False))
        try:
            srv.wait_ready()
            time.sleep(args.warmup)
            segs.append(measure("a", cycle, args.seconds, srv))
        finally:
            srv.stop()

    without_http("a1")
    srv = ServerProcess(server_args(args, bundle, tmp / f"ng{cycle}s", http=True))
    viewers: list[Viewer] = []
    try:
        srv.wait_ready()
        time.sleep(args.warmup)
        segs.append(measure("b", cycle, args.seconds, srv))
        viewers = [Viewer(srv.port, k) for k in range(args.viewers)]
        for v in viewers:
            v.start()
        time.sleep(args.settle)
        segs.append(measure("c", cycle, args.seconds, srv, viewers))
        for v in viewers:
            v.close()
        viewers = []
        time.sleep(args.settle)
        segs.append(measure("b", cycle, args.seconds, srv))
    finally:
        for v in viewers:
            v.close()
        srv.stop()
    without_http("a2")
    return segs


def phase_stats(segs: list[dict], phase: str) -> dict:
    v = [s["fps"] for s in segs if s["phase"] == phase]
    m = statistics.mean(v)
    sd = statistics.stdev(v) if len(v) > 1 else None
    return {"segments": v, "mean_fps": round(m, 2), "stdev": round(sd, 2) if sd is not None else None,
            "cv": round(sd / m, 4) if sd is not None else None, "n": len(v)}


def ratio_with_noise(num: dict, den: dict) -> dict:
    """num/den, and two standard errors of it from the segments' spread (None with one segment)."""
    r = num["mean_fps"] / den["mean_fps"]
    if num["stdev"] is None or den["stdev"] is None:
        return {"ratio": round(r, 4), "two_se": None}
    se = r * math.sqrt((num["stdev"] / num["mean_fps"]) ** 2 / num["n"]
                       + (den["stdev"] / den["mean_fps"]) ** 2 / den["n"])
    return {"ratio": round(r, 4), "two_se": round(2 * se, 4)}


def markdown(result: dict) -> str:
    p = result["phases"]
    rows = ["| phase | segments (fps) | mean fps | ratio | server CPU (cores) | viewers' CPU (this process) "
            "| other CPU | JPEG encodes/s |", "|---|---|---|---|---|---|---|---|"]
    names = {"a": "a: no HTTP server", "b": "b: page on, no viewers", "c": f"c: {result['setup']['viewers']} viewers"}
    for ph in ("a", "b", "c"):
        segs = [s for s in result["segments"] if s["phase"] == ph]
        cpu = lambda k: round(statistics.mean(s["cpu_cores"][k] for s in segs), 3)  # noqa: E731
        ratio = {"a": "1", "b": f"b/a {result['ratios']['b/a']['ratio']:.3f}",
                 "c": f"c/b {result['ratios']['c/b']['ratio']:.3f}, c/a {result['ratios']['c/a']['ratio']:.3f}"}[ph]
        rows.append(f"| {names[ph]} | {', '.join(str(x) for x in p[ph]['segments'])} | {p[ph]['mean_fps']} | {ratio} "
                    f"| {cpu('server')} | {cpu('self')} | {cpu('other')} "
                    f"| {round(statistics.mean(s['jpeg_encodes_per_s'] for s in segs), 1)} |")
    return "\n".join(rows + [""] + criteria_rows(result["criteria"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each segment [30]")
    ap.add_argument("--cycles", type=int, default=2, help="repeats of a, b, c, b, a [2]")
    ap.add_argument("--viewers", type=int, default=5, help="viewers in phase c [5]")
    ap.add_argument("--warmup", type=float, default=5.0, help="after a process's first frame [5]")
    ap.add_argument("--settle", type=float, default=3.0, help="after viewers arrive or leave [3]")
    ap.add_argument("--frame-size", default="640x480")
    ap.add_argument("--spot-every", type=int, default=250, help="one NG part in N [250]")
    ap.add_argument("--stream-fps", type=float, default=15.0, help="the stream's rate cap (the runtime's default) [15]")
    ap.add_argument("--prefill-scores", type=int, default=50_000, help="recent scores held from the start [50000]")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [its default]")
    ap.add_argument("--conv-layers", type=int, default=TOY["conv_layers"],
                    help=f"the toy model's 3x3 conv layers: more, slower model [{TOY['conv_layers']}]")
    ap.add_argument("--out", default=str(HERE / "results" / "station_viewers.json"))
    args = ap.parse_args()

    info, la_before = machine_info(), loadavg()
    segs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgestad-viewers-") as tmp:
        bundle = make_bundle(Path(tmp), args.conv_layers)
        for cycle in range(1, args.cycles + 1):
            segs += run_cycle(args, bundle, Path(tmp), cycle)
    phases = {ph: phase_stats(segs, ph) for ph in ("a", "b", "c")}
    ratios = {"b/a": ratio_with_noise(phases["b"], phases["a"]), "c/b": ratio_with_noise(phases["c"], phases["b"]),
              "c/a": ratio_with_noise(phases["c"], phases["a"])}
    # c against the b segments of its own process (just before and after it): drift-free pairing.
    per_cycle = []
    for cycle in range(1, args.cycles + 1):
        b = [s["fps"] for s in segs if s["cycle"] == cycle and s["phase"] == "b"]
        c = [s["fps"] for s in segs if s["cycle"] == cycle and s["phase"] == "c"]
        a = [s["fps"] for s in segs if s["cycle"] == cycle and s["phase"] == "a"]
        per_cycle.append({"cycle": cycle, "b/a": round(statistics.mean(b) / statistics.mean(a), 4),
                          "c/b": round(statistics.mean(c) / statistics.mean(b), 4)})
    ba, cb = ratios["b/a"], ratios["c/b"]
    noise = f" ± {ba['two_se']:.1%} (2 SE)" if ba["two_se"] is not None else " (one segment each: no noise estimate)"
    criteria = {
        "page on, no viewers: b >= 95 % of a": {
            "measured": f"b/a = {ba['ratio']:.1%}{noise}", "limit": ">= 95 %", "pass": ba["ratio"] >= 0.95},
        "page on, no viewers: b - a within noise ('costs nothing')": {
            "measured": f"{ba['ratio'] - 1:+.1%}{noise}", "limit": "|b/a - 1| <= 2 SE",
            "pass": ba["two_se"] is not None and abs(ba["ratio"] - 1) <= ba["two_se"]},
        f"{args.viewers} viewers: c >= 95 % of b": {
            "measured": f"c/b = {cb['ratio']:.1%}"
                        + (f" ± {cb['two_se']:.1%} (2 SE)" if cb["two_se"] is not None else ""),
            "limit": ">= 95 %", "pass": cb["ratio"] >= 0.95},
    }
    result = {
        "benchmark": "station_viewers",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": {**info, "loadavg_before": la_before, "loadavg_after": loadavg()},
        "setup": {"pipeline": f"toy graph {TOY['height']}x{TOY['width']} with {args.conv_layers} conv layers "
                              f"(ONNX Runtime CPU, threads {args.threads or 'default'}), synthetic source pulled as "
                              f"fast as the pipeline runs (not live), {args.frame_size}, one NG in {args.spot_every}, "
                              "NG store on",
                  "page": f"station + RuntimeHttpServer, stream cap {args.stream_fps:g} fps, recent scores pre-filled "
                          f"with {args.prefill_scores}",
                  "viewers": args.viewers,
                  "viewer": "page + assets once; /api/live; /stream.mjpg?overlay=1; /api/scores every 2 s; "
                            "/api/health every 5 s; /api/gallery + new thumbnails when flagged_seq changes",
                  "order": "a, b, c, b, a per cycle (a: two fresh processes; b, c, b: one process)",
                  "seconds_per_segment": args.seconds, "cycles": args.cycles, "warmup_s": args.warmup,
                  "settle_s": args.settle},
        "segments": segs, "cpu_note": CPU_NOTE, "phases": phases, "ratios": ratios, "per_cycle": per_cycle,
        "criteria": criteria,
        "pass": criteria["page on, no viewers: b >= 95 % of a"]["pass"]
                and criteria[f"{args.viewers} viewers: c >= 95 % of b"]["pass"],
        "disturbed_segments": [f"cycle {x['cycle']} {x['phase']}" for x in segs if x["disturbed"]],
    }
    finish(result, args.out, markdown(result), result["disturbed_segments"],
           " (the 'within noise' line is reported, not required)")


if __name__ == "__main__":
    main()
