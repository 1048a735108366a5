"""What map smoothing (``map_sigma``) does to a trained bundle's accuracy, on the same weights.

    python studies/map_smoothing.py runs/stfpm_bottle --category bottle [--sigmas 0 2 4]

The students do not depend on ``map_sigma`` (it only post-processes the map), so one trained
bundle answers the question for every σ: the bundle's model computes its maps once, unsmoothed,
then each σ applies the model's own ``MapSmoothing`` (the module inside the exported graphs) over
the valid pixels and the model's own masking and image-score rule, and ``edgestad evaluate``'s
metric code scores the result. Writes
studies/results/map_smoothing/<bundle name>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_run import CATEGORIES, data_root  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--category", required=True, choices=sorted(CATEGORIES))
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 2.0, 4.0])
    args = ap.parse_args()

    import torch
    from edgestad.bundle import load_bundle
    from edgestad.contract import uses_valid_box
    from edgestad.datasets import load_test_set
    from edgestad.evaluate import compute_metrics, model_line, to_eval_grid
    from edgestad.methods import load_model
    from edgestad.methods.common.scoring import MapSmoothing

    data = data_root() / CATEGORIES[args.category]
    loaded = load_bundle(args.bundle)
    images, masks, labels, types, _, boxes = load_test_set(data, **loaded.reading, with_boxes=True)
    model = load_model(loaded)
    stored_sigma = getattr(model.config, "map_sigma", 0.0)
    model.map_smoothing = None                     # the unsmoothed map; each σ is applied below
    use_box = uses_valid_box(loaded.manifest["input"])
    box_t = torch.from_numpy(boxes) if use_box else None
    started = time.time()
    raw = []
    with torch.no_grad():
        for start in range(0, len(images), 8):
            x = torch.from_numpy(images[start:start + 8]).permute(0, 3, 1, 2)
            amap, _ = model(x, box_t[start:start + 8] if use_box else None)
            raw.append(amap)
    raw_maps = torch.cat(raw)
    result = {"bundle": str(args.bundle), "model": model_line(loaded.manifest),
              "bundle_map_sigma": stored_sigma, "category": args.category, "data": str(data),
              "date": time.strftime("%Y-%m-%d"), "inference_seconds": round(time.time() - started, 1),
              "command": "python studies/map_smoothing.py " + " ".join(sys.argv[1:]),
              "sigmas": {}}
    for sigma in args.sigmas:
        with torch.no_grad():
            valid = model.valid_mask(box_t) if use_box else None
            smoothed = MapSmoothing(sigma)(raw_maps, valid) if sigma > 0 else raw_maps
            amap, scores = model.finish(smoothed, box_t)
        maps = to_eval_grid(amap[:, 0].numpy(), boxes if use_box else None)
        m = compute_metrics(maps, masks, labels, list(types), scores=scores.numpy())
        result["sigmas"][f"{sigma:g}"] = m
        print(f"{args.bundle.name} σ={sigma:g}: AU-PRO {m['au_pro']:.4f} pixel AUROC "
              f"{m['pixel_auroc']:.4f} image AUROC {m['image_auroc']:.4f}", flush=True)
    dest = ROOT / "studies" / "results" / "map_smoothing" / f"{args.bundle.name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
