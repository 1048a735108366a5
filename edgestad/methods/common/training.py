"""The one training loop every method uses: stages with their own epochs, a checkpoint after
every epoch, exact resume, progress and the loss history.

A method's ``fit`` loads what is pretrained, makes its optimizers and describes its training as
``Stage``s (STFPM: one; STFPM-AE: auto-encoder pretraining, then joint training; RSTPM: the two
student pairs, then the discriminator; Uninformed Students: one per scale). ``TrainingLoop.run``
does the rest, the same way for all:

- on the CPU the model trains with channels-last weights (faster convolutions; the plain layout
  again when the loop ends);
- ``FrozenFeatures``: a frozen teacher's features of the training images, computed once when no
  augmentation changes them between epochs;
- each epoch: ``stage.start_epoch(k)`` (default ``model.train()``), a shuffle drawn from the
  loop's generator (seeded with ``ctx.seed``: augmentation draws from it too, so resume stays
  exact), the batches: ``stage.step(batch, index)`` → loss, zero the stage's optimizers,
  backward, ``stage.after_backward(k)`` (clipping, frozen parts), step them;
- after a stage's last epoch ``stage.finish()`` (e.g. BatchNorm statistics recomputed);
- after every epoch the checkpoint (model, the optimizers that unfinished stages still use, the
  generator, epochs done per stage, history) is written atomically, so an interrupted run
  resumes after its last finished epoch with the same numbers it would have had;
- a resume is refused (``CheckpointMismatch``, naming the difference) when the checkpoint was
  written by another kind of model or a training-relevant setting differs (``training_config``:
  settings training does not depend on, e.g. map smoothing, may change).

Checkpoints of the earlier per-method loops still resume: the shared one-counter form
(``epoch``: epochs done over the stages in order) is read here, Uninformed Students' per-scale
form by its ``upgrade`` function.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..base import FitContext, MethodConfigError, training_config
from .settings import AUGMENTATIONS
from .checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint

# State every AnomalyModel fills after training (the global branch): a checkpoint may lack it.
FILLED_AFTER_TRAINING = ("global_gaussian.", "score_fusion.")


@dataclass
class Stage:
    """One stage of a method's training.

    ``step(batch, index)``: uint8 N×3×H×W images (on the CPU) and their indices in the training
    set → the loss tensor, or (loss, the value to log); ``optimizers``: names (in the loop's
    ``optimizers``) zeroed and stepped around the backward pass; ``label(k)``: the history's
    "stage" of its k-th epoch (default: its name); ``extra``: more fields of its history
    entries."""
    name: str
    epochs: int
    step: Callable
    optimizers: tuple[str, ...] = ()
    start_epoch: Callable[[int], None] | None = None
    after_backward: Callable[[int], None] | None = None
    finish: Callable[[], None] | None = None
    label: Callable[[int], str] | None = None
    extra: dict = field(default_factory=dict)
    desc: str | None = None                 # the progress bar's label (default: its name)


class TrainingLoop:
    """``TrainingLoop(ctx, model, kind, optimizers).run(data, stages)``; see the module doc.

    ``kind``: what the checkpoint holds (refused for another kind); ``frozen``: state-dict
    prefixes of the parts training never changes (pretrained teachers, loaded before it): a
    checkpoint may lack them or hold other levels of them (written with other post-training
    settings); ``upgrade``: turns a method's older checkpoint form into this one."""

    def __init__(self, ctx: FitContext, model, kind: str, optimizers: dict,
                 frozen: tuple[str, ...] = (), upgrade: Callable[[dict], dict] | None = None):
        self.ctx, self.model, self.kind, self.optimizers = ctx, model, kind, optimizers
        self.frozen = tuple(frozen) + FILLED_AFTER_TRAINING
        self.upgrade = upgrade
        self.config = training_config(model.config)
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.history: list[dict] = []
        self.done: dict[str, int] = {}
        self.resumed = False

    # --- resume ----------------------------------------------------------------------------------
    def _resume(self, stages: list[Stage]) -> None:
        path = self.ctx.checkpoint
        if path is None or not Path(path).exists():
            return
        state = load_checkpoint(path)
        if self.upgrade is not None:
            state = self.upgrade(state)
        if state.get("kind") != self.kind:
            raise CheckpointMismatch(
                f"{path}: the checkpoint was written with a different kind ({state.get('kind')!r} "
                f"vs {self.kind!r}); use another output folder or delete it to start over")
        ignored = type(self.model.config).NOT_TRAINED
        stored = {k: v for k, v in (state.get("config") or {}).items() if k not in ignored}
        if stored != self.config:
            raise CheckpointMismatch(
                f"{path}: the checkpoint was written with a different config ({stored!r} vs "
                f"{self.config!r}); use another output folder or delete it to start over")
        result = self.model.load_state_dict(state["model"], strict=False)
        trained = [k for k in result.missing_keys if not k.startswith(self.frozen)]
        foreign = [k for k in result.unexpected_keys if not k.startswith(self.frozen)]
        if trained or foreign:
            raise CheckpointMismatch(
                f"{path}: the checkpoint holds another model (missing {trained[:3]}, unexpected "
                f"{foreign[:3]}); use another output folder or delete it to start over")
        for name, saved in state.get("optimizers", {}).items():
            if name in self.optimizers:
                self.optimizers[name].load_state_dict(saved)
        self.generator.set_state(state["rng"])
        self.history = list(state["history"])
        if "done" in state:
            self.done = dict(state["done"])
        else:      # the earlier one-counter form: epochs done over the stages in order
            left = int(state["epoch"])
            for stage in stages:
                self.done[stage.name] = min(left, stage.epochs)
                left -= self.done[stage.name]
        self.resumed = True

    # --- training --------------------------------------------------------------------------------
    def run(self, data: torch.Tensor, stages: list[Stage],
            fresh_start: Callable[[], None] | None = None) -> list[dict]:
        """Train ``data`` (uint8 N×3×H×W) through ``stages``; the history of every epoch (of this
        run and the ones it resumed). ``fresh_start`` runs only when nothing is resumed."""
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ: {names}")
        self._resume(stages)
        if not self.resumed and fresh_start is not None:
            fresh_start()
        # channels-last weights make PyTorch's CPU convolutions (oneDNN) pick the NHWC kernels:
        # stfpm's training steps ran 1.26x faster on 2 cores (with the teacher stopped at the
        # map's levels), bit-identical weights (docs/results/performance.md); the model leaves
        # the loop in the plain layout again. Not measured on a GPU: the layout stays as it is.
        if torch.device(self.ctx.device).type == "cpu":
            self.model.to(memory_format=torch.channels_last)
        try:
            self._run_stages(data, stages)
        finally:
            self.model.to(memory_format=torch.contiguous_format)
        return self.history

    def _run_stages(self, data: torch.Tensor, stages: list[Stage]) -> None:
        batch_size = self.ctx.batch_size
        steps = (len(data) + batch_size - 1) // batch_size
        for position, stage in enumerate(stages):
            first = self.done.get(stage.name, 0)
            if first >= stage.epochs:
                continue
            bar = _progress(stage.epochs * steps, first * steps, self.ctx.progress,
                            stage.desc or stage.name)
            for k in range(first, stage.epochs):
                (stage.start_epoch or (lambda _: self.model.train()))(k)
                started, losses = time.time(), []
                order = torch.randperm(len(data), generator=self.generator)
                for start in range(0, len(data), batch_size):
                    index = order[start:start + batch_size]
                    losses.append(self._step(stage, data[index], index, k))
                    bar.update(1)
                if k + 1 == stage.epochs and stage.finish is not None:
                    stage.finish()
                self.done[stage.name] = k + 1
                self._save(stages[position:], {
                    "epoch": len(self.history) + 1,
                    "stage": stage.label(k) if stage.label else stage.name,
                    "loss": float(np.mean(losses)) if losses else float("nan"),
                    "seconds": round(time.time() - started, 2), **stage.extra})
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}")
            bar.close()

    def _step(self, stage: Stage, batch: torch.Tensor, index: torch.Tensor, k: int) -> float:
        result = stage.step(batch, index)
        loss, value = result if isinstance(result, tuple) else (result, None)
        optimizers = [self.optimizers[name] for name in stage.optimizers]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if stage.after_backward is not None:
            stage.after_backward(k)
        for opt in optimizers:
            opt.step()
        return float(loss.detach()) if value is None else value

    def _save(self, unfinished: list[Stage], entry: dict) -> None:
        self.history.append(entry)
        if self.ctx.log:
            self.ctx.log(entry)
        if self.ctx.checkpoint is None:
            return
        needed = {name for stage in unfinished for name in stage.optimizers}
        save_checkpoint(self.ctx.checkpoint, {
            "kind": self.kind, "config": self.config, "model": self.model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items() if k in needed},
            "rng": self.generator.get_state(), "epoch": sum(self.done.values()),
            "done": dict(self.done), "history": self.history})


def checkpoint_progress(path: Path) -> dict[str, int] | None:
    """Epochs done per stage of a resume checkpoint ({"": n} for the earlier one-counter form),
    or None when it cannot be read (the method's own load then says why)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return None
    done = state.get("done")
    if isinstance(done, dict) and done:
        # the earlier per-scale form of Uninformed Students named its stages by p alone
        return {f"p={k}" if str(k).isdigit() else str(k): int(v) for k, v in done.items()}
    if isinstance(state.get("epoch"), int):
        return {"": state["epoch"]}
    return None


def _progress(total, initial, enabled, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


# --- small helpers the methods' training shares --------------------------------------------------

# Features of every training image kept at most this large (bytes); a bigger set is computed per
# batch as before (320 images at 256² with EfficientNet-Lite0's stride 4/8/16: ~0.2 GiB).
FROZEN_FEATURES_LIMIT = 2 * 1024 ** 3


class FrozenFeatures:
    """A frozen network's features of the training images, computed once and then looked up.

    Without augmentation a frozen teacher (eval mode, no gradient) sees the same images every
    epoch and gives the same features, so its forward pass need not run in every step: about 6 %
    of an STFPM training on 2 CPU cores, the same weights bit for bit at the same thread count
    (docs/results/performance.md). ``compute(x)`` → {key: N×… tensor} of a normalised batch;
    ``FrozenFeatures(compute, data, normalize, device, enabled)(x, index)`` → the same dict for
    the training images ``index`` (``x``: their normalised batch, used only when not cached). The
    features are computed at the first call, inside the training loop (so in its memory layout),
    in batches of 16 in the data's order; with ``enabled`` false, or when they would exceed
    ``limit`` bytes (default ``FROZEN_FEATURES_LIMIT``), every call computes them from ``x`` as
    before."""

    def __init__(self, compute: Callable, data: torch.Tensor, normalize: Callable, device,
                 enabled: bool, limit: int | None = None):
        self.compute, self.data, self.normalize = compute, data, normalize
        self.device, self.enabled = torch.device(device), enabled
        self.limit = FROZEN_FEATURES_LIMIT if limit is None else limit
        self.cache: dict | None = None

    def _fill(self) -> None:
        with torch.no_grad():
            one = self.compute(self.normalize(self.data[:1].to(self.device)))   # its size
            per_image = sum(t.numel() * t.element_size() for t in one.values())
            if per_image * len(self.data) > self.limit:
                self.enabled = False
                return
            parts = [self.compute(self.normalize(b.to(self.device)))
                     for b in batches_of(self.data, 16)]
        self.cache = {key: torch.cat([p[key] for p in parts]) for key in one}

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> dict:
        if self.enabled and self.cache is None:
            self._fill()
        if not self.enabled:
            return self.compute(x)
        where = index.to(self.device)
        return {key: t[where] for key, t in self.cache.items()}


def batches_of(data: torch.Tensor, batch_size: int, order: torch.Tensor | None = None):
    n = len(data)
    index = order if order is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield data[index[start:start + batch_size]]


def nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 numpy → uint8 N×3×H×W tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a normalised batch, drawn from the loop's generator (so resume
    stays exact): ``flip`` mirrors left-right at random; ``rotate`` also turns each image by a
    random multiple of 90° (of 180° for non-square inputs), for parts that lie at any angle.
    The teacher and the student see the same augmented image (the loss gets ``x``)."""
    if kind == "none":
        return x
    if kind not in AUGMENTATIONS:
        raise MethodConfigError(f"augment: must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")
    mirror = torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5
    x = torch.where(mirror.to(x.device), x.flip(-1), x)
    if kind == "rotate":
        square = x.shape[-1] == x.shape[-2]
        turns = torch.randint(0, 4, (len(x),), generator=generator)
        if not square:
            turns = (turns // 2) * 2
        x = torch.stack([torch.rot90(xi, int(k), dims=(-2, -1)) for xi, k in zip(x, turns)])
    return x
