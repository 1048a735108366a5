"""Where STFPM's level maps are multiplied (``map_grid``): on the input grid, each level upsampled
to the input first (``input``, the papers' wording), or on the finest level's grid and upsampled
once (``finest``: two full-size resizes and products fewer). Issue 17, item 7.

    python studies/map_grid.py --category bottle --category screw --category magnetic_tile

Per category: 1. ``edgestad train DATA --out runs/map_grid/<cat>_input -o map_grid=input`` (the
default otherwise); 2. the same weights with ``map_grid=finest``: ``map_grid`` only changes the
map after the students (a setting a resume ignores), so the second bundle is the first one's
weights with everything fitted after training (score statistics, the global branch's
normalisation, thresholds) fitted again by training's own code on the same validation split
(``studies/refit.py``); 3. ``edgestad evaluate`` of both (AU-PRO, AUROCs, OK/NG at each bundle's
own thresholds); 4. ``edgestad bench`` of both beside EfficientAD-S in the same run
(ONNX Runtime fp32, 2 threads; the bottle bundles: speed does not depend on the category).
Writes studies/results/map_grid.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_run import CATEGORIES, data_root  # noqa: E402
from refit import refit  # noqa: E402

EDGESTAD = [sys.executable, "-m", "edgestad.cli"]


def run(cmd: list, log: Path) -> float:
    started = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); see {log}")
    return round(time.time() - started, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", action="append", choices=sorted(CATEGORIES))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "map_grid")
    ap.add_argument("--out", type=Path, default=ROOT / "studies" / "results" / "map_grid.json")
    ap.add_argument("--bench-seconds", type=float, default=15.0)
    ap.add_argument("--bench-category", default="bottle", help="the category whose bundles are timed")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"commands": [], "categories": {}}
    for category in args.category or sorted(CATEGORIES):
        data = data_root() / CATEGORIES[category]
        a, b = args.work / f"{category}_input", args.work / f"{category}_finest"
        rows = result["categories"][category] = {}
        if not (a / "manifest.json").exists():
            cmd = EDGESTAD + ["train", data, "--out", a, "-o", "map_grid=input"]
            rows["train_seconds"] = run(cmd, args.work / f"{category}_train.log")
            result["commands"].append(" ".join(map(str, cmd[2:])))
        if not (b / "manifest.json").exists():
            refit(a, b, {"map_grid": "finest"})
        for grid, bundle in (("input", a), ("finest", b)):
            cmd = EDGESTAD + ["evaluate", bundle, data, "--out", args.work / f"{bundle.name}_eval"]
            run(cmd, args.work / f"{bundle.name}_eval.log")
            m = json.loads((args.work / f"{bundle.name}_eval" / "metrics.json").read_text())
            d = m.get("decisions_at_bundle_threshold", {})
            rows[grid] = {k: m[k] for k in ("au_pro", "pixel_auroc", "image_auroc")}
            rows[grid].update({k: d.get(k) for k in ("defective_ng", "defective_total", "good_ng",
                                                      "good_total", "promised_good_rejected")})
            print(category, grid, rows[grid], flush=True)
        if category == args.bench_category:   # speed does not depend on the category
            for grid, bundle in (("input", a), ("finest", b)):
                report = args.work / f"{bundle.name}_bench.json"
                cmd = EDGESTAD + ["bench", bundle, "--backends", "ort-fp32", "--batch", "1", "--batch", "8",
                                  "--threads", "2", "--peer", "efficientad-s", "--max-seconds",
                                  str(args.bench_seconds), "--json", report]
                run(cmd, args.work / f"{bundle.name}_bench.log")
                result.setdefault("bench", {})[grid] = json.loads(report.read_text())
    result["commands"].append("python studies/map_grid.py " + " ".join(
        f"--category {c}" for c in (args.category or sorted(CATEGORIES))))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
