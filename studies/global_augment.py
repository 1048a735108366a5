"""Would the global branch's Gaussian fitted on flipped and rotated training images help parts
that lie at any angle? (issue 17, items 2 and 4; training-free, the same student weights.)

    python studies/global_augment.py runs/screw:screw [--threads 1] [--name global_augment_screw]

For a trained bundle (the default, ``edgestad train DATA --out B``): the teacher's pooled
features of the bundle's own training split, as they are (``none``: what training fits), with
their horizontal/vertical flips (``flip``, ×4) and with the flips of the transposed images too
(``dihedral``, ×8: every 90° rotation and mirror); the Gaussian per level fitted on each
(``fit_gaussian``, Ledoit–Wolf), the fusion normalised on the bundle's validation goods as
training does, the image threshold by the bundle's rank rule at 5 %; then image AUROC (fused,
global alone, map alone) and defective / good parts NG on the test set. ``none`` reproduces the
bundle's own evaluation (a check that the study scores as the product does).
Writes studies/results/NAME.json.
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

FLIPS = (lambda x: x, lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.flip(-1).flip(-2))
VARIANTS = {"none": FLIPS[:1], "flip": FLIPS,
            "dihedral": FLIPS + tuple(lambda x, f=f: f(x.transpose(-1, -2)) for f in FLIPS)}


def study(bundle_dir: Path, category: str) -> dict:
    import torch
    from sklearn.metrics import roc_auc_score

    from edgestad.bundle import load_bundle
    from edgestad.datasets import bundle_split, load_images, load_test_set
    from edgestad.methods import load_model
    from edgestad.methods.common.global_score import (fit_gaussian, fused_scores, mahalanobis,
                                                      normalization_of, pooled)
    from edgestad.thresholds import rank_threshold

    bundle = load_bundle(bundle_dir)
    model = load_model(bundle).eval()
    config = bundle.manifest["method_config"]
    train_paths, val_paths = bundle_split(bundle.manifest["provenance"])

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)

    train = nchw(load_images(train_paths, **bundle.reading))
    val = nchw(load_images(val_paths, **bundle.reading))
    test, _, labels, _, _ = load_test_set(bundle.manifest["provenance"]["data"], **bundle.reading)
    test = nchw(test)

    @torch.no_grad()
    def pooled_features(images, transform=FLIPS[0], map_scores=False):
        """Pooled teacher features per global level (and the map score: one pass, as the graph)."""
        levels, maps = [[] for _ in config["global_levels"]], []
        for start in range(0, len(images), 8):
            x = model.normalize_input(transform(images[start:start + 8]).contiguous())
            if map_scores:
                amap, features = model.map_and_features(x)
                maps.append(model.finish(amap, None)[1].numpy())
            else:                                  # training images: the teacher alone
                teacher = model.teacher_levels(x)
                features = [teacher[s] for s in config["global_levels"]]
            for i, f in enumerate(features):
                levels[i].append(pooled(f.float(), None).numpy())
        return [np.concatenate(v) for v in levels], (np.concatenate(maps) if map_scores else None)

    def global_scores(features, gaussians):
        return sum(mahalanobis(f, mean, precision) for f, (mean, precision) in zip(features, gaussians))

    val_features, val_map = pooled_features(val, map_scores=True)
    test_features, test_map = pooled_features(test, map_scores=True)
    kind = config["score_normalization"]
    out = {}
    for variant, transforms in VARIANTS.items():
        per_level = [[] for _ in config["global_levels"]]
        for transform in transforms:
            for i, f in enumerate(pooled_features(train, transform)[0]):
                per_level[i].append(f)
        gaussians = [fit_gaussian(np.concatenate(f))[:2] for f in per_level]
        val_global, test_global = global_scores(val_features, gaussians), global_scores(test_features, gaussians)
        norm = normalization_of(val_map, kind) + normalization_of(val_global, kind)
        val_fused = fused_scores(val_map, val_global, norm, config["score_fusion"])
        test_fused = fused_scores(test_map, test_global, norm, config["score_fusion"])
        ng = test_fused > rank_threshold(val_fused, 0.05)["threshold"]
        out[variant] = {"train_images_fitted": len(train) * len(transforms),
                        "image_auroc": float(roc_auc_score(labels, test_fused)),
                        "image_auroc_global": float(roc_auc_score(labels, test_global)),
                        "image_auroc_map": float(roc_auc_score(labels, test_map)),
                        "defective_ng": int(ng[labels == 1].sum()), "defective_total": int((labels == 1).sum()),
                        "good_ng": int(ng[labels == 0].sum()), "good_total": int((labels == 0).sum())}
        print(bundle_dir, category, variant, out[variant], flush=True)
    return {"bundle": str(bundle_dir), "category": category, "variants": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="BUNDLE:CATEGORY (category: bottle, screw, magnetic_tile)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    ap.add_argument("--name", default="global_augment", help="results file stem (studies/results/NAME.json)")
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    runs = [study(*parse_run(spec)) for spec in args.runs]
    result = {"study": "global_augment", "command": shlex.join(["python", "studies/global_augment.py", *sys.argv[1:]]),
              "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": runs}
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
