"""Which image score and which threshold rule give decisions a line can trust, on a trained bundle.

    python studies/decisions.py runs/stfpm_screw --category screw [--name screw_s1] [--cache DIR]
    python studies/decisions.py --summary [--set NAME]   # all categories' results together

``--name`` stores one training's result under its own name (default: the category), so that
several trainings of a category (split seeds) can be judged together: ``--set NAME`` ranks the
results in ``studies/results/decisions/NAME/`` (default: the category files in the folder itself).

The students do not depend on the image-score rule, the global branch or the threshold rule (all
fitted after training), so one trained bundle answers for every candidate, on the same weights:

1. the bundle's model computes the (smoothed) maps of the validation and test images once; each
   map-score rule (``max``, ``topk:F``) is the model's own ``image_score`` over the pixels its
   image score counts (``scored_region``: the valid ones less the bundle's ``score_margin``);
2. the pretrained teacher (the same frozen weights as the bundle's) gives the pooled features of
   the training, validation and test images at strides 4–32; the global Gaussian of each level
   set is fitted on the training images (Ledoit–Wolf, ``global_score.fit_gaussian``);
3. each fusion (normalisation ``z`` / ``quantile`` × rule ``sum`` / ``max``) is normalised on the
   validation good images only (``global_score.normalization_of`` / ``fused_scores``);
4. image AUROC on the test set for every candidate; for each, the decisions at thresholds set by
   each rule from the validation scores only (defects never seen): what was promised (false-reject
   rate) and what was delivered on the test goods, and the defective parts caught.

Writes studies/results/decisions/<category>.json; ``--summary`` ranks the candidates by their
worst and mean image AUROC over the categories present and writes summary.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_run import CATEGORIES  # noqa: E402

OUT = ROOT / "studies" / "results" / "decisions"
MAP_RULES = ("max", "topk:0.001", "topk:0.01", "topk:0.05")
LEVEL_SETS = ((16,), (32,), (16, 32), (8, 16, 32), (4, 8, 16, 32))
FUSIONS = tuple(itertools.product(("z", "quantile"), ("sum", "max")))


def _features(bundle, args):
    """Per split: map scores per rule (val, test) and pooled teacher features per stride."""
    import torch
    from edgestad.datasets import bundle_split, load_images, load_test_set
    from edgestad.methods import load_model
    from edgestad.methods.common.backbones import PRETRAINED, FeaturePyramid
    from edgestad.methods.common.global_score import pooled
    from edgestad.methods.common.scoring import image_score

    manifest = bundle.manifest
    model = load_model(bundle)
    reading = bundle.reading                      # size, resize rule, region of interest
    letterbox = reading["resize"] == "letterbox"
    data = Path(manifest["provenance"]["data"])
    train_paths, val_paths = bundle_split(manifest["provenance"])
    teacher = FeaturePyramid(model.config.backbone, (4, 8, 16, 32), weights=PRETRAINED).eval()
    strides = teacher.strides

    def run(images, boxes, maps: bool):
        scores = {r: [] for r in MAP_RULES}
        feats = {s: [] for s in strides}
        with torch.no_grad():
            for start in range(0, len(images), 8):
                batch = torch.from_numpy(images[start:start + 8]).permute(0, 3, 1, 2)
                box = torch.from_numpy(boxes[start:start + 8]) if letterbox else None
                valid = None if box is None else model.valid_mask(box)
                x = model.normalize_input(batch)
                for s, f in zip(strides, teacher(x)):
                    feats[s].append(pooled(f, valid).numpy())
                if maps:
                    amap, _ = model.finish(model.anomaly_map(x), box)
                    region = model.scored_region(box)     # valid pixels less the score margin
                    for r in MAP_RULES:
                        scores[r].append(image_score(amap, r, region).numpy())
        return ({r: np.concatenate(v) for r, v in scores.items()} if maps else None,
                {s: np.concatenate(v) for s, v in feats.items()})

    train, train_boxes = load_images(train_paths, **reading, with_boxes=True)
    _, train_feats = run(train, train_boxes, maps=False)
    val, val_boxes = load_images(val_paths, **reading, with_boxes=True)
    val_scores, val_feats = run(val, val_boxes, maps=True)
    images, _, labels, defect_types, _, boxes = load_test_set(
        data, **reading, with_boxes=True)
    test_scores, test_feats = run(images, boxes, maps=True)
    return {"train_feats": train_feats, "val_scores": val_scores, "val_feats": val_feats,
            "test_scores": test_scores, "test_feats": test_feats, "labels": labels,
            "defect_types": defect_types}


def _threshold_rules(val: np.ndarray) -> dict[str, tuple[float, float]]:
    """rule → (threshold, promised false-reject rate), from validation good scores only."""
    from statistics import NormalDist
    n = len(val)
    mu, sd = float(np.mean(val)), float(np.std(val, ddof=1))
    ordered = np.sort(val)[::-1]
    out = {}
    for target in (0.01, 0.05):
        z = NormalDist().inv_cdf(1 - target)
        out[f"normal_fit@{target:g}"] = (mu + z * sd, target)
        k = int(np.floor(target * (n + 1)))           # conformal: k-th largest validation score
        if k >= 1:
            out[f"rank@{target:g}"] = (float(ordered[k - 1]), k / (n + 1))
    out["largest_validation"] = (float(ordered[0]), 1 / (n + 1))
    return out


def _auroc(scores, labels) -> float:
    from edgestad.metrics import image_auroc
    return float(image_auroc(np.asarray(scores, np.float64), labels))


def analyse(cache: dict) -> dict:
    from edgestad.methods.common.global_score import fit_gaussian, fused_scores, mahalanobis, normalization_of

    labels = np.asarray(cache["labels"])
    types = list(cache["defect_types"])
    good, bad = labels == 0, labels == 1

    def globals_for(levels):
        val, test = 0.0, 0.0
        for s in levels:
            mean, precision, _ = fit_gaussian(cache["train_feats"][s])
            val = val + mahalanobis(cache["val_feats"][s], mean, precision)
            test = test + mahalanobis(cache["test_feats"][s], mean, precision)
        return val, test

    candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for rule in MAP_RULES:
        candidates[f"map {rule}"] = (cache["val_scores"][rule], cache["test_scores"][rule])
    glob = {levels: globals_for(levels) for levels in LEVEL_SETS}
    for levels, pair in glob.items():
        candidates[f"global {'+'.join(map(str, levels))}"] = pair
    for rule, levels, (norm, fuse) in itertools.product(MAP_RULES, LEVEL_SETS, FUSIONS):
        mv, mt = cache["val_scores"][rule], cache["test_scores"][rule]
        gv, gt = glob[levels]
        nm = normalization_of(mv, norm) + normalization_of(gv, norm)
        candidates[f"{rule} {fuse}({norm}) global {'+'.join(map(str, levels))}"] = (
            fused_scores(mv, gv, nm, fuse), fused_scores(mt, gt, nm, fuse))
    result = {}
    for name, (val, test) in candidates.items():
        entry = {"image_auroc": round(_auroc(test, labels), 4), "thresholds": {}}
        entry["per_defect_type"] = {
            t: round(_auroc(test[good | (np.array(types) == t)],
                            labels[good | (np.array(types) == t)]), 4)
            for t in sorted(set(types) - {"good"})}
        for rule, (thr, promised) in _threshold_rules(np.asarray(val)).items():
            entry["thresholds"][rule] = {
                "promised_good_ng": round(promised, 4),
                "delivered_good_ng": round(float((test[good] > thr).mean()), 4),
                "defective_ng": round(float((test[bad] > thr).mean()), 4)}
        result[name] = entry
    return {"validation_images": int(len(cache["val_scores"]["max"])),
            "test_good": int(good.sum()), "test_defective": int(bad.sum()),
            "candidates": result}


def summary(folder: Path = OUT) -> None:
    files = sorted(folder.glob("*.json"))
    results = {f.stem: json.loads(f.read_text()) for f in files
               if folder != OUT or f.stem in CATEGORIES}
    cats = sorted(results)
    names = [n for n in results[cats[0]]["analysis"]["candidates"]
             if all(n in results[c]["analysis"]["candidates"] for c in cats)]
    rows = []
    for n in names:
        au = [results[c]["analysis"]["candidates"][n]["image_auroc"] for c in cats]
        rows.append((min(au), float(np.mean(au)), n, au))
    rows.sort(key=lambda r: (-r[1], -r[0]))
    made = "--summary" + ("" if folder == OUT else f" --set {folder.name}")
    lines = [f"Image AUROC of every candidate image score on {', '.join(cats)} (same trained "
             f"bundles; made by `python studies/decisions.py {made}`). Ranked by the mean.",
             "", "| image score | " + " | ".join(cats) + " | mean | worst |",
             "|---|" + "---:|" * (len(cats) + 2)]
    for worst, mean, n, au in rows:
        lines.append(f"| {n} | " + " | ".join(f"{a:.3f}" for a in au) +
                     f" | {mean:.3f} | {worst:.3f} |")
    lines += ["", "Threshold rules on the best-ranked score (promised → delivered good NG, "
              "defective NG; validation goods only):", "",
              "| category | rule | promised good NG | delivered good NG | defective NG |",
              "|---|---|---:|---:|---:|"]
    best = rows[0][2]
    for c in cats:
        for rule, t in results[c]["analysis"]["candidates"][best]["thresholds"].items():
            lines.append(f"| {c} | {rule} | {t['promised_good_ng']:.3f} | "
                         f"{t['delivered_good_ng']:.3f} | {t['defective_ng']:.3f} |")
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(rows, cats, folder)
    print("\n".join(lines[:40]))


def _plot(rows, cats, folder: Path) -> None:
    """Every candidate's image AUROC per category (one dot per category, sorted by the mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = {"map": "tab:blue", "global": "tab:green", "fused": "tab:red"}
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, (_, mean, name, au) in enumerate(rows):
        kind = "map" if name.startswith("map ") else "global" if name.startswith("global ") else "fused"
        ax.scatter([i] * len(au), au, s=8, color=kinds[kind], alpha=0.6)
        ax.scatter([i], [mean], s=14, color="black", marker="_")
    for kind, color in kinds.items():
        ax.scatter([], [], color=color, label=f"{kind} score")
    ax.set_xlabel(f"candidate image scores, best mean first ({len(rows)})")
    ax.set_ylabel(f"image AUROC ({', '.join(cats)})")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(folder / "summary.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, nargs="?")
    ap.add_argument("--category", choices=sorted(CATEGORIES))
    ap.add_argument("--cache", type=Path, default=None,
                    help="Folder for the computed scores and features (reused when present).")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--name", default=None,
                    help="Store the result as NAME.json (default: the category).")
    ap.add_argument("--set", dest="result_set", default=None,
                    help="Write/read results in studies/results/decisions/SET/ (several trainings).")
    args = ap.parse_args()
    folder = OUT / args.result_set if args.result_set else OUT
    if args.summary:
        summary(folder)
        return
    if args.bundle is None or args.category is None:
        ap.error("BUNDLE and --category are required (or --summary)")
    from edgestad.bundle import load_bundle
    bundle = load_bundle(args.bundle)
    started = time.time()
    cache_file = (args.cache / f"{args.name or args.category}.npz") if args.cache else None
    if cache_file is not None and cache_file.is_file():
        raw = np.load(cache_file, allow_pickle=False)
        cache = json.loads(str(raw["meta"]))
        cache = {"labels": raw["labels"], "defect_types": cache["defect_types"],
                 **{k: {(int(s) if s.isdigit() else s): raw[f"{k}/{s}"] for s in cache[k]}
                    for k in ("train_feats", "val_scores", "val_feats", "test_scores", "test_feats")}}
    else:
        cache = _features(bundle, args)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            arrays = {f"{k}/{s}": v for k in ("train_feats", "val_scores", "val_feats",
                                                "test_scores", "test_feats")
                      for s, v in cache[k].items()}
            meta = {"defect_types": cache["defect_types"],
                    **{k: [str(s) for s in cache[k]] for k in ("train_feats", "val_scores",
                                                               "val_feats", "test_scores", "test_feats")}}
            np.savez(cache_file, labels=cache["labels"], meta=json.dumps(meta), **arrays)
    report = {"bundle": str(args.bundle), "category": args.category,
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "method": bundle.manifest["method"],
              "method_config": bundle.manifest["method_config"],
              "date": time.strftime("%Y-%m-%d"),
              "analysis": analyse(cache), "seconds": round(time.time() - started, 1)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{args.name or args.category}.json").write_text(json.dumps(report, indent=1))
    best = sorted(report["analysis"]["candidates"].items(), key=lambda kv: -kv[1]["image_auroc"])[:8]
    for name, e in best:
        print(f"{name}: image AUROC {e['image_auroc']:.4f}")


if __name__ == "__main__":
    main()
