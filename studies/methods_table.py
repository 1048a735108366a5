"""The per-method results table of docs/results/real-data.md, from the committed result files.

    python studies/methods_table.py > studies/results/methods_table.md

Rows: studies/results/methods/*.json (method_run.py); cost columns from
studies/results/methods_bench.json (one `edgestad bench` run of every method beside
EfficientAD-S) when present.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PUBLISHED = {  # best published numbers of the reference documents (bottle), for the table
    ("stfpm", "bottle"): "anomalib STFPM, ResNet-18: pixel AUROC 0.971, image AUROC 0.979",
    ("rstpm", "bottle"): "AU-PRO 0.973, pixel AUROC 0.993",
    ("stfpm_ae", "bottle"): "pixel AUROC 0.984",
    ("uninformed_students", "bottle"): "AU-PRO 0.931 (multi-scale)",
}


def main() -> None:
    cost = {}
    bench = RESULTS / "methods_bench.json"
    if bench.is_file():
        for m in json.loads(bench.read_text())["models"]:
            ort = {r["batch"]: r for r in m["results"] if r["backend"] == "ort-fp32" and r["status"] == "ok"}
            cost[m["method"] if m["method"] != "peer" else m["name"]] = (
                m["gflop_per_frame"], ort.get(1, {}).get("latency_ms", {}).get("p50"),
                ort.get(8, {}).get("throughput_fps"))
    print("| method | category | epochs | map σ | AU-PRO | pixel AUROC | image AUROC | defective NG | good NG "
          "| train wall time | GFLOP/frame | ORT b1 ms | ORT b8 fps | Δ AU-PRO fp16 / int8 | published |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    notes = []
    for path in sorted((RESULTS / "methods").glob("*.json")):
        r = json.loads(path.read_text())
        mark = ""
        if r["steps"]["train"].get("note"):
            notes.append(r["steps"]["train"]["note"])
            mark = "*" * len(notes)
        m = r["metrics"]
        d = m["decisions_at_bundle_threshold"]
        ex = r.get("export") or {}
        delta = " / ".join(f"{(ex.get(p) or {}).get('accuracy', {}).get('delta_au_pro', float('nan')):+.4f}"
                           for p in ("fp16", "int8")) if ex else "—"
        g, b1, b8 = cost.get(r["method"], (None, None, None))
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        training = r["bundle"]["training"]
        epochs = str(training["epochs"])
        if r["method"] == "rstpm":              # pair epochs + discriminator epochs
            from edgestad.methods import get_method
            default = get_method("rstpm").option("disc_epochs").default
            epochs += f"+{(training.get('options') or {}).get('disc_epochs', default)}"
        sigma = r["bundle"]["method_config"].get("map_sigma", 0)   # absent: before map smoothing
        print(f"| {r['method']} | {r['category']} | {epochs} | {sigma:g} | "
              f"{m['au_pro']:.3f} | {m['pixel_auroc']:.3f} | {m['image_auroc']:.3f} | "
              f"{d['defective_ng']}/{d['defective_total']} | {d['good_ng']}/{d['good_total']} | "
              f"{r['steps']['train']['seconds'] / 60:.1f} min{mark} | {fmt(g, '.2f')} | {fmt(b1, '.0f')} | "
              f"{fmt(b8, '.1f')} | {delta} | {PUBLISHED.get((r['method'], r['category']), '—')} |")
    if "efficientad-s" in cost:
        g, b1, b8 = cost["efficientad-s"]
        print(f"| EfficientAD-S (peer, timed only) | — | — | — | — | — | — | — | — | — | {g:.2f} | {b1:.0f} | {b8:.1f} | — | — |")
    for i, note in enumerate(notes, 1):
        print(f"\n{'*' * i} {note}")


if __name__ == "__main__":
    main()
