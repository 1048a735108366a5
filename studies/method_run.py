"""One method on one real category, end to end, with the commands a user would type.

    python studies/method_run.py --method stfpm --category bottle [--epochs N] [--out runs/x] [--from-step S]

Runs, each as its own `edgestad` process (wall time and peak memory from /usr/bin/time):
1. `edgestad train DATA --out OUT --method M [--epochs N] [extra train options]`
2. `edgestad evaluate OUT DATA` (the bundle's own image-score rule and thresholds)
3. `edgestad export OUT` (fp32, fp16, int8; ONNX Runtime parity and accuracy on the test set)
then re-scores the evaluation's maps with other image-score rules (the same maps, so only the
rule differs) and writes everything, commands included, to
studies/results/methods/<method>_<category>[_<tag>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = {"bottle": "mvtec_ad/bottle", "screw": "mvtec_ad/screw",
              "magnetic_tile": "magnetic_tile/magnetic_tile"}


def data_root() -> Path:
    return Path(os.environ.get("EDGESTAD_DATA", ROOT.parent / "shared" / "data"))


def timed(cmd: list[str], log: Path) -> dict:
    """Run a command under /usr/bin/time -v; its output goes to ``log``."""
    started = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return {"command": shlex.join(cmd), "seconds": round(time.time() - started, 1),
            "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None}


def from_log(log: Path) -> dict:
    """A finished step's record, read back from its /usr/bin/time log (``--from-step``)."""
    text = log.read_text()
    cmd = re.search(r'Command being timed: "(.*)"', text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    if not (cmd and wall and status and status.group(1) == "0"):
        sys.exit(f"{log}: not the log of a finished, successful step")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {"command": cmd.group(1), "seconds": round(seconds, 1),
            "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "note": f"read back from {log.name} (the step ran in an earlier invocation)"}


def rescore(bundle: Path, data: Path, rules: list[str]) -> dict:
    """Image AUROC and decisions of other image-score rules on the same maps (torch model)."""
    import numpy as np
    import torch
    from edgestad.bundle import load_bundle
    from edgestad.contract import uses_valid_box
    from edgestad.datasets import load_test_set
    from edgestad.methods import load_model
    from edgestad.methods.common.scoring import image_score
    from edgestad.metrics import image_auroc
    loaded = load_bundle(bundle)
    images, _, labels, _, _, boxes = load_test_set(data, **loaded.reading, with_boxes=True)
    model = load_model(loaded)
    use_box = uses_valid_box(loaded.manifest["input"])
    maps, masks = [], []
    with torch.no_grad():
        for start in range(0, len(images), 8):
            x = torch.from_numpy(images[start:start + 8]).permute(0, 3, 1, 2)
            box = torch.from_numpy(boxes[start:start + 8]) if use_box else None
            amap, _ = model(x, box)
            maps.append(amap)
            masks.append(model.valid_mask(box) if box is not None else None)
    out = {}
    for rule in rules:
        scores = np.concatenate([image_score(m, rule, v).numpy() for m, v in zip(maps, masks)])
        out[rule] = {"image_auroc": float(image_auroc(scores, labels))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--category", required=True, choices=sorted(CATEGORIES))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--train-option", action="append", default=[],
                    help="extra `edgestad train` option (repeat), e.g. --train-option=--image-score=topk:0.01")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--from-step", choices=["train", "evaluate", "export"], default="train",
                    help="skip the steps before this one: their records are read back from their "
                         "logs in runs/logs (e.g. after an export failed)")
    args = ap.parse_args()
    edgestad = str(ROOT / ".venv" / "bin" / "edgestad")
    data = data_root() / CATEGORIES[args.category]
    name = f"{args.method}_{args.category}" + (f"_{args.tag}" if args.tag else "")
    out = args.out or ROOT / "runs" / name
    logs = ROOT / "runs" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = {"method": args.method, "category": args.category, "data": str(data),
              "date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "steps": {}}
    train = [edgestad, "train", str(data), "--out", str(out), "--method", args.method, "--force"]
    if args.epochs:
        train += ["--epochs", str(args.epochs)]
    train += args.train_option
    order = ["train", "evaluate", "export"]
    skip = set(order[:order.index(args.from_step)])
    result["steps"]["train"] = (from_log(logs / f"{name}.train.log") if "train" in skip
                                else timed(train, logs / f"{name}.train.log"))
    eval_dir = Path(str(out) + "_eval")
    evaluate = [edgestad, "evaluate", str(out), str(data), "--out", str(eval_dir)]
    result["steps"]["evaluate"] = (from_log(logs / f"{name}.eval.log") if "evaluate" in skip
                                   else timed(evaluate, logs / f"{name}.eval.log"))
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    result["metrics"] = {k: metrics[k] for k in ("au_pro", "pixel_auroc", "image_auroc", "parts",
                                                 "decisions_at_bundle_threshold", "model",
                                                 "image_score_rule", "resize", "per_defect_type")}
    manifest = json.loads((out / "manifest.json").read_text())
    result["bundle"] = {"method_config": manifest["method_config"], "backbone": manifest["backbone"],
                        "training": {k: v for k, v in manifest["provenance"]["training"].items()
                                     if k != "history"},
                        "loss_curve": [h["loss"] for h in manifest["provenance"]["training"]["history"]],
                        "thresholds": manifest["thresholds"], "images": manifest["provenance"]["images"]}
    result["image_score_rules"] = rescore(out, data, ["max", "topk:0.001", "topk:0.01", "topk:0.05"])
    if not args.no_export:
        result["steps"]["export"] = timed([edgestad, "export", str(out)], logs / f"{name}.export.log")
        report = json.loads((out / "export_report.json").read_text())
        result["export"] = {p: {"parity_vs_torch": (g.get("parity") or {}).get("vs_torch", {}).get("max_rel_diff_map"),
                                "accuracy": g.get("accuracy")} for p, g in report["graphs"].items()}
    dest = ROOT / "studies" / "results" / "methods" / f"{name}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    m = result["metrics"]
    d = m["decisions_at_bundle_threshold"]
    print(f"{name}: AU-PRO {m['au_pro']:.3f} pixel AUROC {m['pixel_auroc']:.3f} image AUROC "
          f"{m['image_auroc']:.3f}; NG {d['defective_ng']}/{d['defective_total']} defective, "
          f"{d['good_ng']}/{d['good_total']} good; train {result['steps']['train']['seconds']} s -> {dest}")


if __name__ == "__main__":
    main()
