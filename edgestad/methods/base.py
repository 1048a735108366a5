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
    image_false_reject: float = 0.01
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
        input is the anomaly map, whose small values fp16 / int8 would flatten)."""
        return ("map_smoothing",) if getattr(config, "map_sigma", 0) else ()

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


def training_config(config) -> dict:
    """The config as a resume checkpoint records and checks it: without ``map_sigma``, which only
    post-processes the map (training does not depend on it, so changing it, or resuming a
    checkpoint written before it existed, must not refuse the resume)."""
    return {k: v for k, v in config.to_dict().items() if k != "map_sigma"}


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
            state = load_checkpoint(path, expect={"kind": kind, "config": config})
            model.load_state_dict(state["model"])
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


def train_epochs(model, data: torch.Tensor, ctx: FitContext, optimizers: dict, loss_of,
                 desc: str = "training", flip: bool = False) -> list[dict]:
    """The resumable epoch loop the feature-matching methods share: shuffled batches of the
    uint8 images, normalised (and randomly flipped left-right with ``flip``), ``loss_of(x)``,
    one step of every optimizer; model, optimizers and RNG checkpointed after each epoch."""
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
            x = model.normalize_input(batch.to(device))
            if flip:
                mirror = torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5
                x = torch.where(mirror.to(device), x.flip(-1), x)
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
