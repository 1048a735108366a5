"""Student training (Uninformed Students §3.2, eq. 7).

M students with the teacher's architecture, randomly initialised, regress the teacher's descriptors
of anomaly-free images, normalised per channel by their mean and standard deviation over the
training set.

Why random crops and offsets instead of the dense map: each descriptor depends only on its own p×p
patch, so the loss over the dense map is a mean over independent per-pixel terms. The strided
network T̂ applied to a crop starting at pixel (y0, x0) gives exactly the dense descriptors at
(y0 + 2^k·i, x0 + 2^k·j). Drawing crop positions uniformly therefore samples the dense loss without
bias, at 4^k times less computation per step (k = number of poolings).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from edgestad.train.checkpoint import load_checkpoint, save_checkpoint

from .model import UninformedStudents


def _padded(model: UninformedStudents, images_uint8: torch.Tensor, p: int) -> torch.Tensor:
    """Normalised images padded like PatchNet.dense pads them (p//2 before, p after)."""
    x = model.normalize_input(images_uint8)
    return F.pad(x, (p // 2, p, p // 2, p), mode=model.config.padding_mode)


@torch.no_grad()
def fit_descriptor_stats(model: UninformedStudents, images: torch.Tensor, device,
                         batch_size: int = 8) -> None:
    """Per-channel mean and std of each teacher's descriptors over the training images."""
    for p in model.config.patch_sizes:
        teacher = model.teachers[str(p)]
        total = total_sq = None
        count = 0
        for start in range(0, len(images), batch_size):
            x = model.normalize_input(images[start:start + batch_size].to(device))
            desc = teacher.dense(x, 2 ** teacher.num_poolings, model.config.padding_mode)
            desc = desc.double()
            s, sq = desc.sum(dim=(0, 2, 3)), (desc ** 2).sum(dim=(0, 2, 3))
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
            count += desc.shape[0] * desc.shape[2] * desc.shape[3]
        mean = total / count
        std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
        mean_buf, std_buf = model.descriptor_stats(p)
        mean_buf.copy_(mean.view_as(mean_buf).float())
        std_buf.copy_(std.view_as(std_buf).float())


def train_students(model: UninformedStudents, images: np.ndarray, checkpoint_path, *,
                   epochs: int = 100, batch_size: int = 1, lr: float = 1e-4,
                   weight_decay: float = 1e-5, crop_size: int | None = None, device="cpu",
                   seed: int = 0, progress: bool = True, log=None) -> list[dict]:
    """Train every scale's students; resumable per epoch from ``checkpoint_path``.

    images: N×H×W×3 uint8 training images (already resized). crop_size: side of the image region
    each step sees (None = whole image).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.to(device)
    data = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # N×3×H×W uint8
    history: list[dict] = []
    done: dict[str, int] = {}
    generator = torch.Generator().manual_seed(seed)
    state = None
    if checkpoint_path is not None and checkpoint_path.exists():
        # dense_stride only changes inference (students train on the strided T̂), so a run may
        # resume with another one.
        state = load_checkpoint(checkpoint_path, expect={"kind": "students",
                                                          "config": _training_config(model)})
        model.load_state_dict(state["model"])
        history, done = state["history"], state["done"]
        generator.set_state(state["rng"])
    else:
        fit_descriptor_stats(model, data, device)

    for p in model.config.patch_sizes:
        students = model.students[str(p)]
        teacher = model.teachers[str(p)].eval()
        optimizer = torch.optim.Adam(students.parameters(), lr=lr, weight_decay=weight_decay)
        first_epoch = done.get(str(p), 0)
        if state is not None and state.get("optimizer_scale") == str(p):
            optimizer.load_state_dict(state["optimizer"])
        if first_epoch >= epochs:
            continue
        mean, std = model.descriptor_stats(p)
        stride = 2 ** teacher.num_poolings
        steps = (len(data) + batch_size - 1) // batch_size
        bar = tqdm(total=epochs * steps, initial=first_epoch * steps, disable=not progress,
                   desc=f"students p={p}", dynamic_ncols=True)
        students.train()
        for epoch in range(first_epoch, epochs):
            start, losses = time.time(), []
            order = torch.randperm(len(data), generator=generator)
            for b in range(steps):
                batch = data[order[b * batch_size:(b + 1) * batch_size]].to(device)
                padded = _padded(model, batch, p)
                region = _random_region(padded, p, stride, crop_size, generator)
                with torch.no_grad():
                    target = (teacher(region) - mean) / std
                loss = sum(((s(region) - target) ** 2).sum(1).mean() for s in students)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()) / len(students))
                bar.update(1)
            entry = {"patch_size": p, "epoch": epoch + 1, "loss": float(np.mean(losses)),
                     "seconds": round(time.time() - start, 2)}
            history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
            if log:
                log(entry)
            done[str(p)] = epoch + 1
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "kind": "students", "config": _training_config(model),
                    "model": model.state_dict(), "history": history, "done": done,
                    "optimizer": optimizer.state_dict(), "optimizer_scale": str(p),
                    "rng": generator.get_state()})
        bar.close()
        students.eval()
    return history


def _training_config(model: UninformedStudents) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k != "dense_stride"}


def _random_region(padded: torch.Tensor, p: int, stride: int, crop_size: int | None,
                   generator: torch.Generator) -> torch.Tensor:
    """A region of the padded image whose top-left is uniform over dense positions.

    The padded image has p//2 pixels before the image and p after; a region starting at padded
    pixel y0 holds the patches centred on image rows y0, y0 + stride, ... The full region
    (crop_size None) starts at a random offset below the network stride, so every dense position
    is reachable, and ends where the last image pixel's patch ends.
    """
    height = padded.shape[-2] - p - p // 2   # the image's own height and width
    width = padded.shape[-1] - p - p // 2
    if crop_size is None or crop_size >= min(height, width):
        oy, ox = (int(v) for v in torch.randint(0, stride, (2,), generator=generator))
        return padded[..., oy:height + p - 1, ox:width + p - 1]
    span = crop_size + p - 1
    y0 = int(torch.randint(0, height - crop_size + 1, (1,), generator=generator))
    x0 = int(torch.randint(0, width - crop_size + 1, (1,), generator=generator))
    return padded[..., y0:y0 + span, x0:x0 + span]
