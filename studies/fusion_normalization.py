"""Is the fusion's normalisation robust to a few odd validation goods? (issue 17, item 2)

    python studies/fusion_normalization.py runs/screw_s0:screw runs/screw_s1:screw ... [--name N]

The fused image score adds the map score and the global score, each normalised on the bundle's
validation goods (``score_normalization``; default ``quantile``, EfficientAD's
(s − q0.9)/(q0.995 − q0.9)·0.1). With 42–133 validation images q0.995 is nearly the largest
score, so one odd good part can set a part's scale, and with it the weight of that part in the sum.
This study scores the validation and test images of each trained bundle once with the bundle's own
model (``AnomalyModel.scores``: map score and global score, the bundle's weights and Gaussian) and
refits only the normalisation, by the two the product offers (``quantile``, ``z``) and three
robust ones (median and q0.9; median and IQR; q0.5 and q0.95); the image threshold by the bundle's
rank rule at 5 % on the validation goods. Per bundle and rule: image AUROC, defective and good
parts NG, and the map part's scale relative to the global part's (larger: the map weighs less).
Writes studies/results/NAME.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from promise import OUT, parse_run  # noqa: E402


def _tail(q_low: float, q_high: float, factor: float = 1.0):
    def fit(s):
        lo, hi = np.quantile(s, q_low), np.quantile(s, q_high)
        return float(lo), float(hi - lo) / factor
    return fit


NORMALIZATIONS = {
    "quantile (default)": None,            # the product's own, global_score.normalization_of
    "z": None,
    "median, q0.9": _tail(0.5, 0.9),
    "median, IQR": lambda s: (float(np.median(s)), float(np.quantile(s, 0.75) - np.quantile(s, 0.25))),
    "q0.5, q0.95": _tail(0.5, 0.95),
}


def parts(bundle_dir: Path, threads: int) -> dict:
    """Map and global scores of the bundle's validation goods and of the test set."""
    import torch
    from edgestad.bundle import load_bundle
    from edgestad.datasets import bundle_split, load_images, load_test_set
    from edgestad.methods import load_model

    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_dir)
    model = load_model(bundle).eval()
    if not model.has_global_branch:
        sys.exit(f"{bundle_dir}: the bundle has no global branch (nothing is fused)")
    letterbox = bundle.reading["resize"] == "letterbox"
    _, val_paths = bundle_split(bundle.manifest["provenance"])

    @torch.no_grad()
    def score(images, boxes):
        maps, globals_ = [], []
        for start in range(0, len(images), 8):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + 8])).permute(0, 3, 1, 2)
            box = torch.from_numpy(boxes[start:start + 8]) if letterbox else None
            _, map_score, global_score = model.scores(x, box)
            maps.append(map_score.numpy())
            globals_.append(global_score.numpy())
        return np.concatenate(maps).astype(np.float64), np.concatenate(globals_).astype(np.float64)

    val, val_boxes = load_images(val_paths, **bundle.reading, with_boxes=True)
    test, _, labels, _, _, test_boxes = load_test_set(bundle.manifest["provenance"]["data"],
                                                       **bundle.reading, with_boxes=True)
    (vm, vg), (tm, tg) = score(val, val_boxes), score(test, test_boxes)
    return {"val_map": vm, "val_global": vg, "test_map": tm, "test_global": tg,
            "labels": np.asarray(labels)}


def compare(p: dict) -> dict:
    from sklearn.metrics import roc_auc_score
    from edgestad.methods.common.global_score import normalization_of
    from edgestad.thresholds import rank_threshold

    labels = p["labels"]
    out = {"image_auroc_map": float(roc_auc_score(labels, p["test_map"])),
           "image_auroc_global": float(roc_auc_score(labels, p["test_global"])), "rules": {}}
    for name, fit in NORMALIZATIONS.items():
        if fit is None:
            kind = name.split()[0]
            fit = lambda s, kind=kind: normalization_of(s, kind)      # noqa: E731
        (om, sm), (og, sg) = fit(p["val_map"]), fit(p["val_global"])
        val = (p["val_map"] - om) / sm + (p["val_global"] - og) / sg
        test = (p["test_map"] - om) / sm + (p["test_global"] - og) / sg
        ng = test > rank_threshold(val, 0.05)["threshold"]
        out["rules"][name] = {"image_auroc": float(roc_auc_score(labels, test)),
                              "defective_ng": int(ng[labels == 1].sum()),
                              "defective_total": int((labels == 1).sum()),
                              "good_ng": int(ng[labels == 0].sum()), "good_total": int((labels == 0).sum()),
                              "map_scale_over_global_scale": sm / sg}
    return out


def table(runs: list[dict]) -> str:
    names = list(NORMALIZATIONS)
    lines = ["| training | map alone | global alone | " + " | ".join(names) + " |",
             "|---|---:|---:|" + "---|" * len(names)]
    for r in runs:
        cells = [f"{v['image_auroc']:.3f}; {v['defective_ng']}/{v['defective_total']}, "
                 f"{v['good_ng']}/{v['good_total']}" for v in r["rules"].values()]
        lines.append(f"| {r['category']} {Path(r['bundle']).name} | {r['image_auroc_map']:.3f} | "
                     f"{r['image_auroc_global']:.3f} | " + " | ".join(cells) + " |")
    means = [np.mean([r["rules"][n]["image_auroc"] for r in runs]) for n in names]
    worst = [min(r["rules"][n]["image_auroc"] for r in runs) for n in names]
    lines.append("| mean / worst image AUROC | | | " +
                 " | ".join(f"{m:.3f} / {w:.3f}" for m, w in zip(means, worst)) + " |")
    lines += ["", "(each cell: fused image AUROC; defective NG, good NG at the rank rule's 5 % threshold)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="BUNDLE:CATEGORY")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="fusion_normalization")
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        bundle, category = parse_run(spec)
        runs.append({"bundle": str(bundle), "category": category, **compare(parts(bundle, args.threads))})
        print(table(runs[-1:]).splitlines()[2], flush=True)
    md = table(runs)
    command = "python studies/fusion_normalization.py " + shlex.join(args.runs)
    result = {"study": "fusion_normalization", "command": command,
              "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": runs}
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (OUT / f"{args.name}.md").write_text(f"`{command}` ({result['date_utc']})\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
