"""One table and plot of every default-method combination measured on bottle, screw and
magnetic_tile together: accuracy, the decisions at each bundle's own thresholds, cost and
ONNX Runtime speed beside EfficientAD-S timed in the same run, and training time (issue 17,
item 8). It reads what the runs wrote; it trains nothing:

    python studies/map_grid.py                              # Lite0: map_grid input and finest
    python studies/method_run.py --method stfpm --category C --tag lite1 \\
        --train-option=--backbone=efficientnet-lite1 --no-export          # (and lite2; each C)
        # (tag lite1_default60: screw's Lite1 again at the 60-epoch default)
    edgestad bench runs/stfpm_screw_lite1 --backends ort-fp32 --batch 1 --batch 8 --threads 2 \\
        --peer efficientad-s --json studies/results/backbone_bench_lite1.json       # (and lite2)
    python studies/method_run.py --method stfpm --category C --tag size384 \\
        --train-option=--input-size=384 --no-export        # input size 384 (bottle, magnetic_tile)
    python studies/decisions_frontier.py

The map_grid rows were trained at the default of their day (30 epochs, 10 % validation); the
Lite1/Lite2 and size rows say their own epochs and validation share (the "trained" column), so
rows of different defaults are not read as one comparison.

Writes studies/results/decisions_frontier.{json,md,png}.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "studies" / "results"
CATEGORIES = ("bottle", "screw", "magnetic_tile")
SPEED_KEYS = ("gflop", "peer_gflop", "fps@1", "peer_fps@1", "x_peer@1", "fps@8", "peer_fps@8", "x_peer@8")
MAP_GRID_TRAINED = "30 ep, 10 % val"        # studies/map_grid.py ran at the default of its day
# Lite0 at the current default (the 60-epoch step rule, 20 % validation, 4 px score margin), seed 0:
# the trainings of docs/results/real-data.md "Training longer, and the frame's edge", judged by
# studies/promise.py / studies/score_margin.py (no pixel AUROC or training time in those files)
LITE0_DEFAULT = {"bottle": ("promise_bottle_default_s0.json", "bottle_new_s0", 60),
                 "screw": ("score_margin_screw_s0.json", "screw_ep60_s0_m4", 60),
                 "magnetic_tile": ("score_margin_mt.json", "mt_v20_s0_m4", 30)}
# studies/method_run.py --tag T results (stfpm_<category>_<T>.json) that belong in the frontier
RUN_TAGS = ("lite1", "lite2", "lite1_default60", "size384")


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


def row(name: str, category: str, m: dict, d: dict, train_s, bench: dict | None, trained: str) -> dict:
    return {"config": name, "category": category, "trained": trained, "au_pro": m["au_pro"], "pixel_auroc": m["pixel_auroc"],
            "image_auroc": m["image_auroc"], "defective_ng": d["defective_ng"],
            "defective_total": d["defective_total"], "good_ng": d["good_ng"], "good_total": d["good_total"],
            "promised_good_ng": d.get("promised_good_rejected"), "train_s": train_s,
            **(speed(bench) if bench else dict.fromkeys(SPEED_KEYS))}


def trained_as(run: dict) -> str:
    """A method_run result's training: epochs and validation share."""
    b = run["bundle"]
    share = b["images"]["validation"] / (b["images"]["validation"] + b["images"]["train"])
    return f"{b['training']['epochs']} ep, {round(100 * share)} % val"


def collect() -> list[dict]:
    rows = []
    grid = json.loads((RESULTS / "map_grid.json").read_text())
    for category in CATEGORIES:
        c = grid["categories"].get(category)
        if not c:
            continue
        for g, name in (("input", "Lite0, map_grid input"), ("finest", "Lite0, map_grid finest")):
            r = c[g]
            rows.append(row(name, category, r, r, c.get("train_seconds"), grid["bench"][g], MAP_GRID_TRAINED))
    for category, (name, bundle, epochs) in LITE0_DEFAULT.items():
        run = next(r for r in json.loads((RESULTS / name).read_text())["runs"] if Path(r["bundle"]).name == bundle)
        m = {"au_pro": run["au_pro"], "pixel_auroc": None, "image_auroc": run["image_auroc"]}
        d = {**{k: run[k] for k in ("defective_ng", "defective_total", "good_ng", "good_total")},
             "promised_good_rejected": run["promised"]}
        rows.append(row("Lite0, map_grid finest (the default)", category, m, d, None, grid["bench"]["finest"],
                        f"{epochs} ep, {round(100 * run['split']['val_fraction'])} % val"))
    for tag in RUN_TAGS:
        for category in CATEGORIES:
            f = RESULTS / "methods" / f"stfpm_{category}_{tag}.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            config = r["bundle"]["method_config"]
            lite = config["backbone"].replace("efficientnet-lite", "Lite")
            size = config["input_size"][0]
            name = f"{lite}{'' if size == 256 else f', {size}²'}, map_grid {config.get('map_grid', 'input')}"
            # the graph's cost is timed per backbone at 256² (a Lite1 bundle of any training)
            bench_file = RESULTS / f"backbone_bench_{lite.lower()}.json"
            bench = json.loads(bench_file.read_text()) if size == 256 and bench_file.exists() else None
            rows.append(row(name, category, r["metrics"], r["metrics"]["decisions_at_bundle_threshold"],
                            r["steps"]["train"]["seconds"], bench, trained_as(r)))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| config | category | trained | AU-PRO | pixel AUROC | image AUROC | defective NG | good NG (promised) | "
             "GFLOP | ORT fps b1 / b8 | × EfficientAD-S b1 / b8 | training |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        promised = f" ({100 * r['promised_good_ng']:.1f} %)" if r["promised_good_ng"] is not None else ""
        train = f"{r['train_s'] / 60:.1f} min" if r["train_s"] else "—"
        pixel = f"{r['pixel_auroc']:.3f}" if r["pixel_auroc"] is not None else "—"
        cost = (f"{r['gflop']:.2f} | {r['fps@1']:.1f} / {r['fps@8']:.1f} | {r['x_peer@1']} / {r['x_peer@8']}"
                if r["gflop"] is not None else "not timed | | ")
        lines.append(
            f"| {r['config']} | {r['category']} | {r['trained']} | {r['au_pro']:.3f} | {pixel} | "
            f"{r['image_auroc']:.3f} | {r['defective_ng']}/{r['defective_total']} | "
            f"{r['good_ng']}/{r['good_total']}{promised} | {cost} | {train} |")
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
        if x is None:                                   # not timed: no place on the speed axis
            continue
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
