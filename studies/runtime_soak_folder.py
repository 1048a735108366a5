"""Soak of the real model through `edgestad run --folder`: N frames in = N decided = N events.

    python studies/runtime_soak_folder.py --bundle runs/stfpm_bottle \\
        --images ../shared/data/mvtec_ad/bottle/test --frames 10000

Makes a folder of N symlinks cycling over the real test images, runs `edgestad run BUNDLE
--folder DIR --events EV --events-all` as its own process, samples that process's RSS and thread
count from /proc once a second, and checks the run summary and the events log. Writes
studies/results/runtime_soak_folder.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def proc_stat(pid: int) -> tuple[float, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["Threads"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--images", required=True, help="folder whose images (recursively) are cycled")
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "runtime_soak_folder.json"))
    args = ap.parse_args()
    sources = sorted(p for p in Path(args.images).rglob("*.png"))
    with tempfile.TemporaryDirectory(prefix="edgestad-soak-") as tmp:
        frames, events = Path(tmp) / "frames", Path(tmp) / "events"
        frames.mkdir()
        for i in range(args.frames):
            (frames / f"{i:06d}.png").symlink_to(sources[i % len(sources)].resolve())
        cmd = [str(ROOT / ".venv" / "bin" / "edgestad"), "run", str(args.bundle), "--folder", str(frames),
               "--events", str(events), "--events-all", "--backend", "onnxruntime", "--precision", "fp32"]
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples = []
        while proc.poll() is None:
            stat = proc_stat(proc.pid)
            if stat:
                samples.append({"t": round(time.time() - started, 1), "rss_mib": round(stat[0], 1),
                                "threads": stat[1]})
            time.sleep(1.0)
        out, err = proc.communicate()
        seconds = time.time() - started
        summary = json.loads(out.strip().splitlines()[-1])["summary"] if out.strip() else {}
        lines = [json.loads(l) for f in sorted(events.glob("events*.jsonl")) for l in f.read_text().splitlines()]
    frame_events = [e for e in lines if e.get("event") in ("ok", "ng") or "score" in e]
    steady = samples[len(samples) // 10:] or samples
    result = {
        "command": " ".join(cmd[:2] + [args.bundle, "--folder", "<N symlinks>"] + cmd[5:]).replace(str(ROOT) + "/", ""),
        "frames_in": args.frames, "exit_code": proc.returncode, "seconds": round(seconds, 1),
        "fps": round(args.frames / seconds, 2), "summary": summary,
        "frame_events_written": len(frame_events),
        "rss_mib_first_10pct_end": steady[0]["rss_mib"] if steady else None,
        "rss_mib_end": samples[-1]["rss_mib"] if samples else None,
        "rss_mib_max": max(s["rss_mib"] for s in samples) if samples else None,
        "threads_min_max_after_warmup": [min(s["threads"] for s in steady), max(s["threads"] for s in steady)] if steady else None,
        "samples": samples[:: max(1, len(samples) // 100)],
        "stderr_tail": err[-2000:], "load_average": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "stderr_tail")}, indent=1))


if __name__ == "__main__":
    main()
