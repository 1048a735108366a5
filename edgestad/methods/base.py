"""The Method interface: what a method folder provides, with defaults for the optional parts.

A method is one folder under ``edgestad/methods/`` holding its config (a dataclass whose fields
read like the paper's table), its model (an ``AnomalyModel``: uint8 images → map, score), its
losses and its training loop, registered by name with ``@register``. The generic driver
(``edgestad.train.fit``) does split → prepare → build → fit → calibrate → thresholds → bundle for
every method; evaluate, export, bench and the runtime know nothing method-specific.

Verbs:
- ``prepare(config, options)``: settle what depends on files (e.g. a teacher's width); default
  as is;
- ``build(config)``: the model with random / empty weights (loading a bundle fills them);
- ``fit(model, images, ctx)``: load pretrained parts, train, resumable per epoch;
- ``calibrate(model, images, boxes, device)``: statistics from validation good images stored in
  the model's buffers (default: none);
optional hooks:
- ``parts(model, x)``: named partial maps (per level / scale) that ``evaluate`` reports;
- ``deploy_forms()``: alternative graph forms of the same model (e.g. a fused ensemble);
- ``fp32_modules(config)``: module paths whose operations must stay float32 in the fp16/int8
  graphs, beyond the structural rule (everything after the last convolution).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

RESIZE_CHOICES = ("auto", "area_or_linear", "letterbox")


class MethodConfigError(ValueError):
    """A setting does not exist for the method or has a bad value; the message names it."""


class ConfigMixin:
    """to_dict / from_dict for the config dataclasses (tuples stored as JSON lists).

    ``STORED_DEFAULTS``: values for settings added after bundles were written without them, so an
    older bundle loads with the behaviour it was calibrated with (e.g. ``map_sigma`` 0 = no map
    smoothing), not the new default.
    """

    STORED_DEFAULTS: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise MethodConfigError(f"unknown method_config keys for {cls.__name__}: {sorted(unknown)}")
        values = {**cls.STORED_DEFAULTS, **values}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class TrainSettings:
    """Training settings every method understands; ``None`` = the method's own default."""
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    val_fraction: float = 0.1
    pixel_fpr: float = 0.001
    image_false_reject: float = 0.05               # k = floor(0.05 (n + 1)); 0: the largest
    review_false_reject: float | None = None      # a REVIEW band below the NG threshold
    roi: tuple[int, int, int, int] | None = None  # region of interest x, y, w, h (source pixels)
    defects: str | None = None                    # real defective images: image threshold by recall
    recall: float = 0.95
    seed: int = 0
    options: dict = field(default_factory=dict)   # method-specific (teachers, crop size, ...)


@dataclass
class FitContext:
    """What ``Method.fit`` gets besides the model and the images."""
    epochs: int
    batch_size: int
    lr: float
    device: str = "cpu"
    seed: int = 0
    checkpoint: Path | None = None
    progress: bool = True
    log: Callable[[dict], None] | None = None
    options: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)   # the method records what it loaded here


class Method:
    name: str = ""
    title: str = ""            # one line: what it is
    paper: str = ""            # the reference
    default_backbone: str = ""
    config_cls: type = None    # type: ignore[assignment]
    # epochs, batch_size, lr (and whatever else the method's fit reads from ctx.options)
    defaults: dict = {}
    # TrainSettings.options keys this method understands (the CLI refuses others for it)
    option_names: tuple[str, ...] = ()

    # --- required ------------------------------------------------------------------------------
    def build(self, config) -> torch.nn.Module:
        raise NotImplementedError

    def fit(self, model, images: np.ndarray, ctx: FitContext) -> list[dict]:
        raise NotImplementedError

    # --- defaults ------------------------------------------------------------------------------
    def prepare(self, config, options: dict):
        return config

    def calibrate(self, model, images: torch.Tensor, boxes: torch.Tensor | None, device) -> dict:
        return {}

    def parts(self, model, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def deploy_forms(self) -> dict[str, Callable]:
        return {}

    def fp32_modules(self, config) -> tuple[str, ...]:
        """Module paths kept float32 in the fp16 / int8 graphs. Default: the map smoothing (its
        input is the anomaly map, whose small values fp16 / int8 would flatten) and the global
        branch with the score fusion (a Mahalanobis distance: a matrix product of differences)."""
        modules = ("map_smoothing",) if getattr(config, "map_sigma", 0) else ()
        if getattr(config, "global_branch", False):
            modules += ("global_gaussian", "score_fusion")
        return modules

    def backbone_of(self, config) -> str:
        return getattr(config, "backbone", self.default_backbone)

    def make_config(self, **values):
        """The config from the given values (``None`` = default); unknown names are refused."""
        values = {k: v for k, v in values.items() if v is not None}
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MethodConfigError(
                f"--{unknown[0].replace('_', '-')}: not a setting of method {self.name} "
                f"(its settings: {', '.join(sorted(known))})")
        return self.config_cls(**values)

    def summary(self) -> str:
        return f"{self.title} [{self.paper}; default backbone: {self.default_backbone}]"


# --- small helpers the training loops share ----------------------------------------------------

def batches_of(data: torch.Tensor, batch_size: int, order: torch.Tensor | None = None):
    n = len(data)
    index = order if order is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield data[index[start:start + batch_size]]


def nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 numpy → uint8 N×3×H×W tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


# Settings applied after training (map post-processing, the global branch fitted from frozen
# teacher features, the image-score fusion): a resume ignores them.
POST_TRAINING_SETTINGS = ("map_sigma", "image_score", "global_branch", "global_levels",
                          "score_fusion", "score_normalization")
# State that training never changes: the frozen pretrained teacher(s), loaded before the epoch loop,
# and the global branch, fitted after it. A checkpoint may lack it (written with other
# post-training settings, e.g. before the global branch existed).
FILLED_OUTSIDE_TRAINING = ("teacher.", "teacher1.", "global_gaussian.", "score_fusion.")


def training_config(config) -> dict:
    """The config as a resume checkpoint records and checks it: without the settings that only
    post-process the map or the score (training does not depend on them, so changing one, or
    resuming a checkpoint written before it existed, must not refuse the resume)."""
    return {k: v for k, v in config.to_dict().items() if k not in POST_TRAINING_SETTINGS}


class EpochLoop:
    """Resumable epoch loop state: model, optimizer(s) and RNG saved after every epoch.

    ``start_epoch`` is where to continue; ``save(epoch, history)`` writes the checkpoint
    atomically (train/checkpoint.py)."""

    def __init__(self, ctx: FitContext, model, optimizers: dict, generator: torch.Generator,
                 kind: str, config: dict):
        from edgestad.train.checkpoint import load_checkpoint
        self.ctx, self.model, self.optimizers, self.generator = ctx, model, optimizers, generator
        self.kind, self.config = kind, config
        self.start_epoch, self.history, self.resumed = 0, [], False
        path = ctx.checkpoint
        if path is not None and Path(path).exists():
            state = load_checkpoint(path, expect={"kind": kind})
            stored = {k: v for k, v in (state.get("config") or {}).items()
                      if k not in POST_TRAINING_SETTINGS}   # written by any version
            if stored != config:
                from edgestad.train.checkpoint import CheckpointMismatch
                raise CheckpointMismatch(
                    f"{path}: the checkpoint was written with a different config ({stored!r} vs "
                    f"{config!r}); use another output folder or delete it to start over")
            result = model.load_state_dict(state["model"], strict=False)
            trained = [k for k in result.missing_keys if not k.startswith(FILLED_OUTSIDE_TRAINING)]
            if trained or result.unexpected_keys:
                from edgestad.train.checkpoint import CheckpointMismatch
                raise CheckpointMismatch(
                    f"{path}: the checkpoint holds another model (missing "
                    f"{trained[:3]}, unexpected {result.unexpected_keys[:3]}); use another output "
                    f"folder or delete it to start over")
            for name, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
            generator.set_state(state["rng"])
            self.start_epoch, self.history, self.resumed = state["epoch"], state["history"], True

    def save(self, epoch: int, entry: dict) -> None:
        from edgestad.train.checkpoint import save_checkpoint
        self.history.append(entry)
        if self.ctx.log:
            self.ctx.log(entry)
        if self.ctx.checkpoint is not None:
            save_checkpoint(self.ctx.checkpoint, {
                "kind": self.kind, "config": self.config, "model": self.model.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "rng": self.generator.get_state(), "epoch": epoch, "history": self.history})


AUGMENTATIONS = ("none", "flip", "rotate")


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


def train_epochs(model, data: torch.Tensor, ctx: FitContext, optimizers: dict, loss_of,
                 desc: str = "training", augment: str = "none") -> list[dict]:
    """The resumable epoch loop the feature-matching methods share: shuffled batches of the
    uint8 images, normalised (and augmented, ``augment_batch``), ``loss_of(x)``, one step of
    every optimizer; model, optimizers and RNG checkpointed after each epoch."""
    from tqdm.auto import tqdm
    device = torch.device(ctx.device)
    generator = torch.Generator().manual_seed(ctx.seed)
    loop = EpochLoop(ctx, model, optimizers, generator, kind=type(model).__name__,
                     config=training_config(model.config))
    steps = (len(data) + ctx.batch_size - 1) // ctx.batch_size
    bar = tqdm(total=ctx.epochs * steps, initial=loop.start_epoch * steps, disable=not ctx.progress,
               desc=desc, dynamic_ncols=True)
    for epoch in range(loop.start_epoch, ctx.epochs):
        model.train()
        started, losses = time.time(), []
        order = torch.randperm(len(data), generator=generator)
        for batch in batches_of(data, ctx.batch_size, order):
            x = augment_batch(model.normalize_input(batch.to(device)), augment, generator)
            loss = loss_of(x)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers.values():
                opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
        loop.save(epoch + 1, timed_entry(epoch + 1, losses, started))
        bar.set_postfix(loss=f"{loop.history[-1]['loss']:.4f}")
    bar.close()
    return loop.history


def timed_entry(epoch: int, losses: list[float], started: float, **extra) -> dict:
    return {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
            "seconds": round(time.time() - started, 2), **extra}


def describe(value: Any) -> str:
    return str(value)
