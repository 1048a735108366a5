"""Pipeline overhead: full runtime throughput vs. bare backend inference of the same graph, same run.

- bare: ``backend.infer`` on one preprocessed frame, back to back (no capture, no decode, no
  preprocessing, no outputs) -> the ceiling.
- pipeline: a real video file through ``Pipeline`` (decode + preprocess in the capture thread,
  inference, regions, events log) -> what a line gets.
overhead = 1 - pipeline_fps / bare_fps. Goal: <= 10 % when inference dominates.

    python studies/runtime_overhead.py                 # toy graphs: a conv-heavy one and a trivial one
    python studies/runtime_overhead.py --bundle B      # the real exported model

Writes studies/results/runtime_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def measure(bundle_path: Path, frames: int, video: Path, backend_name: str, threads: int | None, events_dir: Path,
            rounds: int = 3) -> dict:
    from edgestad.bundle import load_bundle
    from edgestad.runtime.backends import select_backend
    from edgestad.runtime.pipeline import Pipeline
    from edgestad.runtime.preprocess import InputSpec, Preprocessor
    from edgestad.runtime.results import Thresholds
    from edgestad.runtime.sinks import EventLog
    from edgestad.runtime.sources import SourceSpec
    import cv2

    bundle = load_bundle(bundle_path)
    backend = select_backend(bundle.path, bundle.manifest, backend_name, intra_op_threads=threads)
    pre = Preprocessor(InputSpec.from_manifest(bundle.manifest))
    cap = cv2.VideoCapture(str(video))
    ok, first = cap.read()
    cap.release()
    batch = pre.batch(first)
    for _ in range(10):  # warm-up (allocations, kernel selection)
        backend.infer(batch)

    # This machine's CPU speed drifts (shared cores): alternate bare and pipeline rounds and
    # compare medians, so drift hits both sides alike.
    thr = Thresholds.from_manifest(bundle.manifest)
    bare_rounds, pipe_rounds, latency = [], [], None
    lost = 0
    for r in range(rounds):
        t0 = time.perf_counter()
        for _ in range(frames):
            backend.infer(batch)
        bare_rounds.append(frames / (time.perf_counter() - t0))
        pipe = Pipeline(SourceSpec("video", str(video)), backend, pre, thr, [EventLog(events_dir / str(r))])
        summary = pipe.run()
        pipe_rounds.append(summary.frames_processed / summary.elapsed_s)
        latency = pipe.snapshot()["latency_ms"]
        lost += summary.frames_captured - summary.frames_processed
    backend.close()
    bare_fps = float(np.median(bare_rounds))
    pipe_fps = float(np.median(pipe_rounds))
    return {
        "backend": backend.name,
        "input": list(backend.input_shape),
        "threads": getattr(backend, "intra_op_threads", threads),
        "frames_per_round": frames,
        "rounds": rounds,
        "bare_fps_rounds": [round(v, 2) for v in bare_rounds],
        "pipeline_fps_rounds": [round(v, 2) for v in pipe_rounds],
        "bare_fps": round(bare_fps, 2),
        "bare_ms_per_frame": round(1000 / bare_fps, 3),
        "pipeline_fps": round(pipe_fps, 2),
        "pipeline_latency_ms_last_round": latency,
        "overhead": round(1 - pipe_fps / bare_fps, 4),
        "frames_lost": lost,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", help="bundle(s) to measure (default: toy graphs)")
    ap.add_argument("--frames", type=int, default=120, help="frames per round (video length)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="640x480", help="video frame size WxH (camera-like)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, action="append",
                    help="ONNX Runtime intra-op threads to try (default: the runtime default, cores-1 on CPU, and all cores)")
    ap.add_argument("--out", default=str(HERE / "results" / "runtime_overhead.json"))
    args = ap.parse_args()
    from test_runtime_toy import make_toy_bundle, write_video

    w, h = (int(v) for v in args.size.split("x"))
    cores = os.cpu_count() or 1
    # None = the runtime's default (cores - 1 on the CPU provider); cores = ORT's own default.
    thread_opts = args.threads or [None] + ([cores] if cores > 1 else [])
    runs = []
    with tempfile.TemporaryDirectory(prefix="edgestad-overhead-") as tmp:
        tmp = Path(tmp)
        video = write_video(tmp / "v.avi", args.frames, w, h, spot_every=25)
        if args.bundle:
            bundles = [(str(b), Path(b)) for b in args.bundle]
        else:
            bundles = [
                ("toy conv-heavy 256x256 (4 x 3x3 conv, 32 ch): inference dominates",
                 make_toy_bundle(tmp / "heavy", 256, 256, conv_layers=4, channels=32)),
                ("toy trivial 256x256 (mean + max): inference is ~free, overhead is all pipeline",
                 make_toy_bundle(tmp / "light", 256, 256)),
            ]
        for label, path in bundles:
            for threads in thread_opts:
                r = measure(path, args.frames, video, args.backend, threads, tmp / f"ev{len(runs)}", args.rounds)
                r["model"] = label
                runs.append(r)
                print(json.dumps({k: r[k] for k in ("model", "threads", "bare_fps", "pipeline_fps", "overhead")}))
    out = {
        "what": "pipeline throughput vs bare backend inference of the same graph in the same process",
        "command": "python studies/runtime_overhead.py" + "".join(f" --bundle {b}" for b in args.bundle or []),
        "video": {"frames": args.frames, "size": [w, h], "codec": "MJPG"},
        "method": "alternating rounds (bare, pipeline) x rounds; medians compared",
        "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": cores, "python": platform.python_version(),
                    "numpy": np.__version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
