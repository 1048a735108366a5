"""`edgestad train`: good images → trained, calibrated model bundle.

Steps: deterministic train/validation split of the good images → teachers (shipped or the user's)
→ teacher descriptor statistics → students → score statistics and thresholds on the validation
images → bundle (written atomically). Interrupted runs resume from ``<bundle>.partial/``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgestad.bundle import sha256_file, write_bundle
from edgestad.data import fingerprint, good_images, load_images, split_train_val
from edgestad.models.uninformed_students import StudentTeacherConfig, UninformedStudents

from .calibrate import fit_score_stats, fit_thresholds, predict
from .checkpoint import read_teacher_file
from .students import train_students
from .teachers import resolve_teachers


@dataclass
class TrainSettings:
    epochs: int = 100               # the paper's 100 epochs at batch size 1
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    crop_size: int | None = None    # train on random crops of this side (None: whole images)
    val_fraction: float = 0.1
    pixel_fpr: float = 0.001
    image_fpr: float = 0.0
    seed: int = 0


def train_bundle(data: Path, bundle_path: Path, config: StudentTeacherConfig,
                 settings: TrainSettings, teachers=(), device: str = "cpu",
                 progress: bool = True, log=None) -> Path:
    data, bundle_path = Path(data), Path(bundle_path)
    started = time.time()
    torch.manual_seed(settings.seed)
    teacher_files = resolve_teachers(config.patch_sizes, teachers)
    paths = good_images(data)
    train_paths, val_paths = split_train_val(paths, settings.val_fraction, settings.seed)
    size = tuple(config.input_size)
    train_images = load_images(train_paths, size, progress=progress)
    val_images = load_images(val_paths, size, progress=progress)

    # The teachers fix the descriptor size d and the width; students copy their architecture.
    teacher_states, teacher_info = {}, {}
    for p, path in teacher_files.items():
        state, meta = read_teacher_file(path)
        shape = (meta["config"]["descriptor_dim"], meta["config"]["width"])
        first = next(iter(teacher_info.values()), None)
        if first is not None and shape != first["shape"]:
            raise ValueError(f"teacher {path} has (descriptor_dim, width)={shape}, the other "
                             f"teachers {first['shape']}: all scales must agree")
        teacher_states[p] = state
        teacher_info[str(p)] = {"file": path.name, "sha256": sha256_file(path), "shape": shape,
                                "iterations": meta["iterations"],
                                "pretrained_cnn": meta["pretrained_cnn"]["name"]}
    d, width = next(iter(teacher_info.values()))["shape"]
    config = dataclasses.replace(config, descriptor_dim=d, width=width)
    model = UninformedStudents(config)
    for p, state in teacher_states.items():
        model.teachers[str(p)].load_state_dict(state)
        model.teachers[str(p)].requires_grad_(False)

    work = bundle_path.parent / f".{bundle_path.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(
        {"data": str(data), "config": config.to_dict(), "settings": settings.__dict__}, indent=1))
    history = train_students(model, train_images, work / "checkpoint.pt", epochs=settings.epochs,
                             batch_size=settings.batch_size, lr=settings.lr,
                             weight_decay=settings.weight_decay, crop_size=settings.crop_size,
                             device=device, seed=settings.seed, progress=progress, log=log)
    val = torch.from_numpy(val_images).permute(0, 3, 1, 2)
    score_stats = fit_score_stats(model, val, device)
    val_maps, val_scores = predict(model, val, device)
    thresholds = fit_thresholds(val_maps, val_scores, settings.pixel_fpr, settings.image_fpr)

    manifest = {
        "method": "uninformed_students",
        "method_config": config.to_dict(),
        "input": {"height": size[0], "width": size[1], "channels": 3, "color": "RGB",
                  "layout": "NCHW", "dtype": "uint8", "value_range": [0, 255],
                  "resize": "area_or_linear", "mean": list(config.mean), "std": list(config.std)},
        "outputs": {"anomaly_map": "float32 N×1×H×W", "image_score": "float32 N (max of map)"},
        "score_stats": score_stats,
        "thresholds": thresholds,
        "image_score": "max",
        "provenance": {
            "data": str(data.resolve()), "data_fingerprint": fingerprint(paths),
            "images": {"train": len(train_paths), "validation": len(val_paths)},
            "split": {"val_fraction": settings.val_fraction, "seed": settings.seed},
            "training": {**settings.__dict__, "device": device,
                         "seconds": round(time.time() - started, 1),
                         "final_loss": {str(h["patch_size"]): h["loss"] for h in history}},
            "teachers": teacher_info, "torch": torch.__version__,
        },
    }
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    write_bundle(bundle_path, manifest, weights)
    shutil.rmtree(work, ignore_errors=True)
    return bundle_path
