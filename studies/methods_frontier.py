"""The accuracy–cost frontier with every method: AU-PRO against GFLOP/frame.

    python studies/methods_frontier.py [--bench studies/results/methods_bench.json]

Reads each method's real-data result (studies/results/methods/<method>_<category>.json, made by
method_run.py), the GFLOP/latency of every method from one `edgestad bench` run beside
EfficientAD-S (methods_bench.json), and the Uninformed Students configurations of the earlier
frontier (frontier_<category>.json, trained CPU-budget bundles), and draws
studies/results/frontier_methods_<category>.png with a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def bench_rows(path: Path) -> dict:
    report = json.loads(path.read_text())
    out = {}
    for m in report["models"]:
        ort = {r["batch"]: r for r in m["results"] if r["backend"] == "ort-fp32" and r["status"] == "ok"}
        out[m["method"] if m["method"] != "peer" else m["name"]] = {
            "gflop": m["gflop_per_frame"],
            "b1_ms": ort.get(1, {}).get("latency_ms", {}).get("p50"),
            "b8_fps": ort.get(8, {}).get("throughput_fps"),
            "config": m.get("method_config")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", type=Path, default=RESULTS / "methods_bench.json")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cost = bench_rows(args.bench)
    for category in ("bottle", "magnetic_tile"):
        points = []
        for path in sorted((RESULTS / "methods").glob(f"*_{category}.json")):
            r = json.loads(path.read_text())
            c = cost.get(r["method"])
            if c is None or r["method"] == "uninformed_students":
                continue
            points.append((r["method"], c["gflop"], r["metrics"]["au_pro"], c, path.name))
        us = []
        frontier = RESULTS / f"frontier_{category}.json"
        if frontier.is_file():
            for row in json.loads(frontier.read_text())["rows"]:
                if row.get("au_pro") is not None and not row.get("fused"):
                    us.append((f"uninformed_students {row['name']}", row["gflop_per_frame"], row["au_pro"]))
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        if us:
            ax.scatter([u[1] for u in us], [u[2] for u in us], c="0.6", s=18,
                       label="uninformed_students (CPU-budget configurations)")
        for i, (name, gflop, au_pro, _, _) in enumerate(points):
            ax.scatter([gflop], [au_pro], s=60, c=f"C{i}", label=name, zorder=3)
        peer = cost.get("efficientad-s")
        if peer:
            ax.axvline(peer["gflop"], color="C3", ls="--", lw=1, label="EfficientAD-S cost (timed, not trained)")
        ax.set_xscale("log")
        ax.set_xlabel("GFLOP / frame (256 × 256)")
        ax.set_ylabel("AU-PRO (FPR ≤ 0.3)")
        ax.set_title(category)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(RESULTS / f"frontier_methods_{category}.png", dpi=120)
        plt.close(fig)
        lines = ["| model | GFLOP/frame | ORT fp32 b1 p50 ms | ORT fp32 b8 frames/s | AU-PRO | source |",
                 "|---|---:|---:|---:|---:|---|"]
        for name, gflop, au_pro, c, src in points:
            lines.append(f"| {name} | {gflop:.2f} | {c['b1_ms']:.1f} | {c['b8_fps']:.1f} | {au_pro:.3f} | methods/{src} |")
        for name, gflop, au_pro in us:
            lines.append(f"| {name} | {gflop:.1f} | | | {au_pro:.3f} | frontier_{category}.json |")
        if peer:
            lines.append(f"| EfficientAD-S (random weights) | {peer['gflop']:.1f} | {peer['b1_ms']:.1f} | {peer['b8_fps']:.1f} | — | {args.bench.name} |")
        (RESULTS / f"frontier_methods_{category}.md").write_text("\n".join(lines) + "\n")
        print(f"wrote frontier_methods_{category}.png/.md ({len(points)} methods, {len(us)} US rows)")


if __name__ == "__main__":
    main()
