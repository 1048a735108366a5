"""One table and plot of every default-method combination measured on bottle, screw and
magnetic_tile together: accuracy, the decisions at each bundle's own thresholds, cost and
ONNX Runtime speed beside EfficientAD-S timed in the same run, and training time (issue 17,
item 8). It reads what the runs wrote; it trains nothing:

    python studies/map_grid.py                              # Lite0: map_grid input and finest
    python studies/method_run.py --method stfpm --category C --tag lite1 \\
        --train-option=--backbone=efficientnet-lite1 --no-export          # (and lite2; each C)
    edgestad bench runs/stfpm_screw_lite1 --backends ort-fp32 --batch 1 --batch 8 --threads 2 \\
        --peer efficientad-s --json studies/results/backbone_bench_lite1.json       # (and lite2)
    python studies/decisions_frontier.py

Writes studies/results/decisions_frontier.{json,md,png}.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "studies" / "results"
CATEGORIES = ("bottle", "screw", "magnetic_tile")


def speed(bench: dict) -> dict:
    """GFLOP/frame, fps at batch 1 and 8 (ORT fp32), and the ratio to EfficientAD-S's fps."""
    ours = next(m for m in bench["models"] if m["name"] != "efficientad-s")
    peer = next(m for m in bench["models"] if m["name"] == "efficientad-s")

    def fps(model, batch):
        return next((r["throughput_fps"] for r in model["results"]
                     if r["backend"] == "ort-fp32" and r["batch"] == batch and r["status"] == "ok"), None)
    out = {"gflop": ours["gflop_per_frame"], "peer_gflop": peer["gflop_per_frame"]}
    for b in (1, 8):
        out[f"fps@{b}"], out[f"peer_fps@{b}"] = fps(ours, b), fps(peer, b)
        out[f"x_peer@{b}"] = round(out[f"fps@{b}"] / out[f"peer_fps@{b}"], 2) if out[f"peer_fps@{b}"] else None
    return out


def row(name: str, category: str, m: dict, d: dict, train_s, bench: dict) -> dict:
    return {"config": name, "category": category, "au_pro": m["au_pro"], "pixel_auroc": m["pixel_auroc"],
            "image_auroc": m["image_auroc"], "defective_ng": d["defective_ng"],
            "defective_total": d["defective_total"], "good_ng": d["good_ng"], "good_total": d["good_total"],
            "promised_good_ng": d.get("promised_good_rejected"), "train_s": train_s, **speed(bench)}


def collect() -> list[dict]:
    rows = []
    grid = json.loads((RESULTS / "map_grid.json").read_text())
    for category in CATEGORIES:
        c = grid["categories"].get(category)
        if not c:
            continue
        for g, name in (("input", "Lite0, map_grid input"), ("finest", "Lite0, map_grid finest (default)")):
            r = c[g]
            rows.append(row(name, category, r, r, c.get("train_seconds"), grid["bench"][g]))
    for lite in ("lite1", "lite2"):
        bench_file = RESULTS / f"backbone_bench_{lite}.json"
        for category in CATEGORIES:
            f = RESULTS / "methods" / f"stfpm_{category}_{lite}.json"
            if not (f.exists() and bench_file.exists()):
                continue
            r = json.loads(f.read_text())
            grid_used = r["bundle"]["method_config"].get("map_grid", "input")
            rows.append(row(f"Lite{lite[-1]}, map_grid {grid_used}", category, r["metrics"], r["metrics"]["decisions_at_bundle_threshold"],
                            r["steps"]["train"]["seconds"], json.loads(bench_file.read_text())))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| config | category | AU-PRO | pixel AUROC | image AUROC | defective NG | good NG (promised) | "
             "GFLOP | ORT fps b1 / b8 | × EfficientAD-S b1 / b8 | training |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        promised = f" ({100 * r['promised_good_ng']:.1f} %)" if r["promised_good_ng"] is not None else ""
        train = f"{r['train_s'] / 60:.1f} min" if r["train_s"] else "same weights"
        lines.append(
            f"| {r['config']} | {r['category']} | {r['au_pro']:.3f} | {r['pixel_auroc']:.3f} | {r['image_auroc']:.3f} | "
            f"{r['defective_ng']}/{r['defective_total']} | {r['good_ng']}/{r['good_total']}{promised} | "
            f"{r['gflop']:.2f} | {r['fps@1']:.1f} / {r['fps@8']:.1f} | {r['x_peer@1']} / {r['x_peer@8']} | {train} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"bottle": "o", "screw": "s", "magnetic_tile": "^"}
    configs = sorted({r["config"] for r in rows})
    colors = dict(zip(configs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in rows:
        x = r["x_peer@1"]
        axes[0].scatter(x, r["image_auroc"], marker=markers[r["category"]], color=colors[r["config"]])
        axes[1].scatter(x, r["defective_ng"] / r["defective_total"], marker=markers[r["category"]],
                        color=colors[r["config"]])
    axes[0].set_ylabel("image AUROC")
    axes[1].set_ylabel("defective parts NG at the bundle's threshold")
    for ax in axes:
        ax.set_xlabel("ONNX Runtime fps ÷ EfficientAD-S fps (batch 1, 2 threads, same run)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[c], marker="o", ls="") for c in configs] + \
              [plt.Line2D([], [], color="grey", marker=m, ls="") for m in markers.values()]
    fig.legend(handles, configs + list(markers), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)


def main() -> None:
    rows = collect()
    (RESULTS / "decisions_frontier.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows)
    (RESULTS / "decisions_frontier.md").write_text(table + "\n")
    plot(rows, RESULTS / "decisions_frontier.png")
    print(table)


if __name__ == "__main__":
    main()
