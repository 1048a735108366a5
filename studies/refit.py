"""A trained bundle with a post-training setting changed, and everything fitted after training
fitted again: the same weights, a new bundle. Used by the studies of settings a resume ignores
(``map_grid``, ``score_margin``; ``POST_TRAINING_SETTINGS`` in ``edgestad/methods/base.py``).

``refit(bundle_dir, out, {"map_grid": "finest"})`` loads the bundle's model, sets the changed
config values, and runs training's own ``train.fit.fit_decisions`` (score statistics, the global
branch's normalisation, thresholds) on the bundle's own validation split (its data folder, split
fraction and seed from the provenance), with its own threshold rule; the new bundle records what
was changed under ``provenance.refit``.
"""
from __future__ import annotations

import json
from pathlib import Path


def refit(bundle_dir: Path, out: Path, changes: dict) -> None:
    """``bundle_dir``'s weights with the config ``changes``, everything after training fitted again."""
    from edgestad.bundle import load_bundle, write_bundle
    from edgestad.datasets import bundle_split, load_images
    from edgestad.methods import get_method, load_model
    from edgestad.methods.base import TrainSettings
    from edgestad.train.fit import fit_decisions

    bundle = load_bundle(bundle_dir)
    manifest = json.loads(json.dumps(bundle.manifest))
    model = load_model(bundle)
    model.config = model.config.replace(**changes)
    prov = manifest["provenance"]
    train_paths, val_paths = bundle_split(prov)
    train = load_images(train_paths, **bundle.reading, with_boxes=True)
    val = load_images(val_paths, **bundle.reading, with_boxes=True)
    rule = manifest["thresholds"]["rule"]
    settings = TrainSettings(val_fraction=prov["split"]["val_fraction"], seed=prov["split"]["seed"],
                             **{k: rule[k] for k in ("pixel_fpr", "image_false_reject", "review_false_reject")
                                if k in rule})
    score_stats, global_branch, thresholds = fit_decisions(
        get_method(manifest["method"]), model, train, val, settings, "cpu")
    manifest["method_config"].update(model.config.to_dict())
    manifest.update(score_stats=score_stats, thresholds=thresholds)
    if global_branch:
        manifest["global_branch"] = global_branch
    prov["refit"] = {"from": str(bundle_dir), "changed": changes,
                     "what": "same weights; score statistics, global branch and thresholds fitted again"}
    for key in ("format", "format_version", "created", "code_version", "files", "decision_digest",
                "exports", "threshold_changes", "evaluation"):
        manifest.pop(key, None)
    write_bundle(out, manifest, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
