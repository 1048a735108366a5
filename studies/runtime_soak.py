"""Soak test of the runtime: >= 10,000 frames through the whole pipeline with every output on.

Source: a real video file; outputs: events log, NG store (small cap, so deletion runs too),
HTTP server with an MJPEG client watching and /metrics + /status polled the whole time.
Records RSS at the start (after warm-up) and the end, and every 1,000 frames, to show leaks.

    python studies/runtime_soak.py                      # toy graph (default), 10,000 frames
    python studies/runtime_soak.py --bundle BUNDLE      # the real exported model

Writes studies/results/runtime_soak.json. Too slow for CI; run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the toy bundle/video helpers live with the tests


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle to run (default: a toy graph written to a temp folder)")
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--size", default="320x240", help="video frame size WxH")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=str(HERE / "results" / "runtime_soak.json"))
    args = ap.parse_args()

    from edgestad.bundle import load_bundle
    from edgestad.runtime.backends import select_backend
    from edgestad.runtime.http import OverlayFeed, RuntimeHttpServer
    from edgestad.runtime.pipeline import Pipeline
    from edgestad.runtime.preprocess import InputSpec, Preprocessor
    from edgestad.runtime.results import Thresholds
    from edgestad.runtime.sinks import CallbackSink, EventLog, NgSaver
    from edgestad.runtime.sources import SourceSpec
    from test_runtime_toy import make_toy_bundle, write_video

    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="edgestad-soak-") as tmp:
        tmp = Path(tmp)
        bundle_path = Path(args.bundle) if args.bundle else make_toy_bundle(tmp / "bundle", 256, 256)
        bundle = load_bundle(bundle_path)
        t0 = time.perf_counter()
        video = write_video(tmp / "soak.avi", args.frames, w, h, spot_every=50)
        video_s = time.perf_counter() - t0

        thr = Thresholds.from_manifest(bundle.manifest)
        backend = select_backend(bundle.path, bundle.manifest, args.backend)
        feed = OverlayFeed(thr, max_fps=15)
        rss_marks: dict[int, float] = {}

        def mark(result):
            if result.index in (200,) or result.index % 1000 == 0:
                rss_marks[result.index] = round(rss_mib(), 2)

        sinks = [EventLog(tmp / "events", max_bytes=256 << 10, backups=3),
                 NgSaver(tmp / "ng", thr, max_bytes=5 << 20), feed, CallbackSink(mark)]
        pipe = Pipeline(SourceSpec("video", str(video)), backend, Preprocessor(InputSpec.from_manifest(bundle.manifest)),
                        thr, sinks)
        server = RuntimeHttpServer("127.0.0.1", 0, pipe.snapshot, feed).start()

        stop = threading.Event()
        client = {"mjpeg_bytes": 0, "polls": 0, "errors": 0}

        def watch_stream():
            try:
                with urllib.request.urlopen(server.url + "/stream.mjpg", timeout=30) as r:
                    while not stop.is_set():
                        chunk = r.read(65536)
                        if not chunk:
                            break
                        client["mjpeg_bytes"] += len(chunk)
            except Exception:  # noqa: BLE001 - the server closes the stream at the end
                pass

        def poll():
            while not stop.wait(0.5):
                for path in ("/metrics", "/status"):
                    try:
                        urllib.request.urlopen(server.url + path, timeout=10).read()
                        client["polls"] += 1
                    except Exception:  # noqa: BLE001
                        client["errors"] += 1

        threads = [threading.Thread(target=watch_stream, daemon=True), threading.Thread(target=poll, daemon=True)]
        for t in threads:
            t.start()
        rss_before = rss_mib()
        summary = pipe.run()
        rss_after = rss_mib()
        stop.set()
        server.close()
        for t in threads:
            t.join(5)
        snap = pipe.snapshot()
        backend.close()
        ng_files = len(list((tmp / "ng").glob("*.json")))

    start = rss_marks.get(200, rss_before)
    out = {
        "what": "runtime soak: video file -> pipeline with events, NG store, HTTP MJPEG client and polling",
        "command": "python studies/runtime_soak.py" + (f" --bundle {args.bundle}" if args.bundle else ""),
        "model": "toy graph 256x256 (tests/test_runtime_toy.py)" if not args.bundle else str(args.bundle),
        "backend": summary.backend,
        "frames": args.frames,
        "frame_size": [w, h],
        "summary": summary.to_dict(),
        "fps": summary.fps,
        "latency_ms": snap["latency_ms"],
        "inference_ms": snap["inference_ms"],
        "rss_mib_before_run": round(rss_before, 2),
        "rss_mib_start_after_200_frames": start,
        "rss_mib_end": round(rss_after, 2),
        "rss_growth_mib_from_frame_200": round(rss_after - start, 2),
        "rss_mib_by_frame": {str(k): v for k, v in sorted(rss_marks.items())},
        "output_queue_max": snap["output_queue_max"],
        "ng_sets_on_disk_at_end": ng_files,
        "http_client": client,
        "video_write_s": round(video_s, 2),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("fps", "rss_mib_start_after_200_frames", "rss_mib_end",
                                          "rss_growth_mib_from_frame_200")}, indent=1))
    lost = summary.frames_captured - summary.frames_processed
    assert summary.frames_processed == args.frames and lost == 0, summary


if __name__ == "__main__":
    main()
