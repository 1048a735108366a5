"""`edgestad train`: good images → trained model bundle with its thresholds, for every method.

split → prepare → build → fit → score statistics → thresholds → bundle:

1. a deterministic train/validation split of the good images (validation images are never
   trained on: they give score statistics and thresholds);
2. the resize rule: ``auto`` letterboxes when the images' aspect ratios differ (squashing would
   distort each one differently), else squashes;
3. the method prepares its config, builds its model, fits it (resumable from
   ``.<bundle>.partial/checkpoint.pt``) and fits its score statistics on the validation images;
4. thresholds from the validation images only (``edgestad.thresholds.fit_thresholds``);
5. the bundle is written atomically. A complete bundle at ``--out`` is never replaced without
   ``force``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from edgestad.bundle import MANIFEST_NAME, write_bundle
from edgestad.datasets import fingerprint, good_images, load_images, split_train_val
from edgestad.images import LETTERBOX_PAD_VALUE, aspect_ratios_vary
from edgestad.methods import get_method
from edgestad.methods.base import FitContext, TrainSettings
from edgestad.methods.common.global_score import fit_global_branch
from edgestad.methods.common.training import checkpoint_progress, nchw
from edgestad.methods.common.scoring import describe_image_score

from edgestad.thresholds import fit_thresholds
from edgestad.torch_loop import run_model

from .augment import choose_augmentation


class TrainError(ValueError):
    """A training request that cannot be carried out; the message names the option or file."""


def _check_same_run(settings_file: Path, checkpoint: Path, data: Path, method: str,
                    epochs_free: dict) -> None:
    """Resume only the run that wrote the checkpoint: same data, method and training settings
    (the epoch count may grow). Anything else is refused, naming the option."""
    if not (checkpoint.exists() and settings_file.is_file()):
        return
    try:
        old = json.loads(settings_file.read_text())
    except ValueError:
        return
    if old.get("data") != str(data):
        raise TrainError(f"DATA: {checkpoint} belongs to a run on {old.get('data')}, not {data}; "
                         f"use another --out or delete {checkpoint.parent} to start over")
    if old.get("method") != method:
        raise TrainError(f"--method: {checkpoint} belongs to a {old.get('method')} run; use another "
                         f"--out or delete {checkpoint.parent} to start over")
    previous = dict(old.get("settings") or {})
    # the augmentation lives in the options; a run written without one trained with none
    previous["augment"] = (previous.get("options") or {}).get("augment", "none")
    for key, value in epochs_free.items():
        if key in previous and previous[key] != value:
            raise TrainError(f"--{key.replace('_', '-')}: {checkpoint} was trained with "
                             f"{previous[key]!r}, not {value!r}; use the same value to resume, "
                             f"another --out, or delete {checkpoint.parent} to start over")


def partial_dir(bundle_path: Path) -> Path:
    return bundle_path.parent / f".{bundle_path.name}.partial"


def resume_line(checkpoint: Path, epochs: int) -> str:
    """'resuming from epoch N of E (<checkpoint>)', N the epochs the checkpoint holds; for a
    method that trains in stages, the epochs done per stage."""
    done = checkpoint_progress(checkpoint)
    if not done:   # the method's own load reports an unreadable checkpoint
        return f"resuming from {checkpoint}"
    if len(done) == 1:
        return f"resuming from epoch {sum(done.values())} of {epochs} ({checkpoint})"
    stages = ", ".join(f"{stage}: {n}" for stage, n in done.items())
    return f"resuming after {sum(done.values())} epochs (epochs done per stage: {stages}; {checkpoint})"


def fit_decisions(method, model, train: tuple, val: tuple, settings: TrainSettings, device: str,
                  echo=print, read_as: tuple | None = None) -> tuple[dict, dict | None, dict]:
    """What the decisions need once the weights are trained, from good images only: the method's
    score statistics and the global branch's Gaussian and fusion (training images for the
    Gaussian, validation images for the normalisation), then the thresholds from the validation
    images' maps and scores. ``train``/``val``: (uint8 N×H×W×3, valid boxes N×4). ``read_as``:
    (size, resize, roi), how to read ``settings.defects`` when the user gave a few real defects.
    Returns (score_stats, global_branch or None, thresholds)."""
    model.eval().to(device)
    val_images, val_boxes = torch.from_numpy(val[0]).permute(0, 3, 1, 2), val[1]
    boxes = torch.from_numpy(val_boxes) if model.takes_valid_box else None
    score_stats = method.fit_score_statistics(model, val_images, boxes, device)
    global_branch = None
    if getattr(model, "has_global_branch", False):
        global_branch = fit_global_branch(
            model, nchw(train[0]), torch.from_numpy(train[1]) if boxes is not None else None,
            val_images, boxes, device)
    val_maps, val_scores = run_model(model, val_images, boxes, device=device)
    thresholds = fit_thresholds(val_maps, val_scores, settings.pixel_fpr,
                                settings.image_false_reject, boxes=val_boxes,
                                review_false_reject=settings.review_false_reject)
    warnings = thresholds.pop("warnings")
    if settings.defects:
        # a few real defects: the image threshold for a recall target, its cost from the
        # validation goods (the same rule as `edgestad thresholds --defects`)
        from edgestad.images import list_images
        from edgestad.thresholds import new_thresholds
        size, resize, roi = read_as
        d_images, d_boxes = load_images(list_images(settings.defects), size, resize=resize,
                                        with_boxes=True, roi=roi)
        _, d_scores = run_model(model, nchw(d_images), torch.from_numpy(d_boxes) if boxes is not None else None,
                                device=device)
        thresholds, rules = new_thresholds(thresholds, defects=[float(v) for v in d_scores],
                                           recall=settings.recall)
        warnings = []   # the rank rule's target no longer sets the image threshold
        echo(f"image threshold from {settings.defects}: {rules[-1]}")
    for warning in warnings:
        echo(warning)
    echo(f"image threshold {thresholds['image']:.6g}: {thresholds['rule']['image']}")
    return score_stats, global_branch, thresholds


def train_bundle(data: Path, bundle_path: Path, method_name: str, config, settings: TrainSettings,
                 device: str = "cpu", progress: bool = True, log=None, force: bool = False,
                 echo=print) -> Path:
    data, bundle_path = Path(data), Path(bundle_path)
    if (bundle_path / MANIFEST_NAME).is_file() and not force:
        raise TrainError(f"--out: {bundle_path} already holds a finished bundle; pass --force to "
                         "replace it (or choose another --out)")
    started = time.time()
    method = get_method(method_name)
    batch_size = settings.batch_size if settings.batch_size is not None else method.defaults["batch_size"]
    lr = settings.lr if settings.lr is not None else method.defaults["lr"]
    options = method.resolve_options(settings.options, config)   # typed, checked, defaults

    paths = good_images(data)
    train_paths, val_paths = split_train_val(paths, settings.val_fraction, settings.seed)
    epochs = settings.epochs
    if epochs is None:
        epochs = method.default_epochs(len(train_paths), batch_size)
        if epochs != method.defaults["epochs"]:
            echo(f"epochs: {epochs} ({len(train_paths)} training images: "
                 f"{method.name}'s default is {method.epochs_rule()})")
    roi = settings.roi
    if getattr(config, "resize", "area_or_linear") == "auto":
        # a region of interest gives every image the same aspect ratio
        rule = "letterbox" if roi is None and aspect_ratios_vary(paths) else "area_or_linear"
        config = config.replace(resize=rule)
        echo(f"resize: {rule} (the training images' aspect ratios "
             f"{'differ' if rule == 'letterbox' else 'agree'})")
    size = tuple(config.input_size)
    train_images, train_boxes = load_images(train_paths, size, progress=progress,
                                            resize=config.resize, with_boxes=True, roi=roi)
    val_images, val_boxes = load_images(val_paths, size, progress=progress, resize=config.resize,
                                        with_boxes=True, roi=roi)

    augment_choice = None
    if options.get("augment") == "auto":
        chosen, why = choose_augmentation(train_images, train_boxes if config.resize == "letterbox" else None,
                                          otherwise=method.option("augment").default)
        settings.options["augment"] = options["augment"] = chosen
        augment_choice = {"augment": chosen, "why": why}
        echo(f"augment: {chosen} ({why})")
    config = method.prepare(config, options)
    torch.manual_seed(settings.seed)
    model = method.build(config)
    work = partial_dir(bundle_path)
    checkpoint = work / "checkpoint.pt"
    if checkpoint.exists():
        echo(resume_line(checkpoint, epochs))
    work.mkdir(parents=True, exist_ok=True)
    _check_same_run(work / "settings.json", checkpoint, data, method.name, epochs_free={
        "batch_size": batch_size, "lr": lr, "seed": settings.seed,
        "val_fraction": settings.val_fraction, "roi": list(roi) if roi else None,
        "augment": settings.options.get("augment", "none")})
    (work / "settings.json").write_text(json.dumps(
        {"data": str(data), "method": method.name, "config": config.to_dict(),
         "settings": {**settings.__dict__, "epochs": epochs, "batch_size": batch_size, "lr": lr}},
        indent=1, default=str))
    ctx = FitContext(epochs=epochs, batch_size=batch_size, lr=lr, device=device, seed=settings.seed,
                     checkpoint=checkpoint, progress=progress, log=log, options=options)
    history = method.fit(model, train_images, ctx)

    score_stats, global_branch, thresholds = fit_decisions(
        method, model, (train_images, train_boxes), (val_images, val_boxes), settings, device, echo,
        read_as=(size, config.resize, roi))
    mean = model.input_mean.flatten().tolist()
    std = model.input_std.flatten().tolist()
    input_section = {"height": size[0], "width": size[1], "channels": 3, "color": "RGB",
                     "layout": "NCHW", "dtype": "uint8", "value_range": [0, 255],
                     "resize": config.resize, "mean": mean, "std": std}
    if config.resize == "letterbox":
        input_section["pad_value"] = LETTERBOX_PAD_VALUE
    if roi is not None:
        input_section["roi"] = list(roi)     # x, y, w, h: cropped before the resize rule
    manifest = {
        "method": method.name,
        "method_config": config.to_dict(),
        "backbone": ctx.provenance.get("backbone") or {"name": method.backbone_of(config)},
        "input": input_section,
        "outputs": {"anomaly_map": "float32 N×1×H×W",
                    "image_score": f"float32 N ({describe_image_score(config)})"},
        "image_score": config.image_score,
        "score_stats": score_stats,
        **({"global_branch": global_branch} if global_branch else {}),
        "thresholds": thresholds,
        "provenance": {
            "data": str(data.resolve()), "data_fingerprint": fingerprint(paths),
            "images": {"train": len(train_paths), "validation": len(val_paths)},
            "split": {"val_fraction": settings.val_fraction, "seed": settings.seed},
            "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                         "seed": settings.seed, "options": settings.options, "device": device,
                         "seconds": round(time.time() - started, 1),
                         "final_loss": history[-1]["loss"] if history else None,
                         "history": history[-50:]},
            **{k: v for k, v in ctx.provenance.items() if k != "backbone"},
            **({"augment_auto": augment_choice} if augment_choice else {}),
            "torch": torch.__version__,
        },
    }
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    write_bundle(bundle_path, manifest, weights)
    shutil.rmtree(work, ignore_errors=True)
    return bundle_path
