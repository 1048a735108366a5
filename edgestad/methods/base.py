"""The Method interface: what a method folder declares, with defaults for the optional parts.

Torch-free: a method folder's ``__init__.py`` declares its Method here (name, paper, defaults,
typed options, config dataclass) without importing its model, so ``edgestad methods``,
``train --help`` and config checks import no torch; the verbs import the model when they run.

A method is one folder under ``edgestad/methods/`` (or a package of the user's, found through
the ``edgestad.methods`` entry-point group) holding its config (a dataclass whose fields read
like the paper's table), its model (an ``AnomalyModel``: uint8 images → map, score) and its
training stages (``common/training.py`` runs them), registered by name with ``@register``. The
generic driver (``edgestad train``) does split → prepare → build → fit → score statistics →
thresholds → bundle for every method; evaluate, export, bench and the runtime know nothing
method-specific.

Verbs (the defaults import the torch side the declaration names: ``model_class``,
``train_function``, ``statistics_function``, ``parts_function``):
- ``prepare(config, options)``: settle what depends on files (e.g. a teacher's width); default
  as is;
- ``build(config)``: the model with random / empty weights (loading a bundle fills them);
- ``fit(model, images, ctx)``: load pretrained parts, train (``common/training.py``: staged,
  resumable per epoch); the options arrive typed and checked (``resolve_options``);
- ``fit_score_statistics(model, images, boxes, device)``: statistics of the model's scores on the
  validation good images (e.g. a map's range, the mean and spread of a regression error), stored
  in the model's buffers for its scoring (default: none);
optional hooks:
- ``parts(model, x)``: named partial maps (per level / scale) that ``evaluate`` reports;
- ``deploy_forms()``: alternative graph forms of the same model (e.g. a fused ensemble);
- ``fp32_modules(config)``: module paths whose operations must stay float32 in the fp16/int8
  graphs, beyond the structural rule (everything after the last convolution);
- ``int8_fp16_feeds(config)``: module paths whose inputs the int8 graph must not quantize (the
  backbone layers feeding them run fp16 there);
- ``tiny(workdir)``: a tiny, fast instance (what the conformance test trains and exports).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar


class MethodConfigError(ValueError):
    """A setting does not exist for the method or has a bad value; the message names it."""


# Settings applied after training (map post-processing, the global branch fitted from frozen
# teacher features, the image-score fusion): a resume ignores them.
POST_TRAINING_SETTINGS = ("map_sigma", "map_grid", "image_score", "score_margin", "global_branch",
                          "global_levels", "score_fusion", "score_normalization")


class ConfigMixin:
    """to_dict / from_dict for the config dataclasses (tuples stored as JSON lists).

    ``STORED_DEFAULTS``: values for settings added after bundles were written without them, so an
    older bundle loads with the behaviour it was trained with (e.g. ``map_sigma`` 0 = no map
    smoothing), not the new default. ``NOT_TRAINED``: settings training does not depend on (a
    resume ignores them).
    """

    STORED_DEFAULTS: ClassVar[dict] = {}
    NOT_TRAINED: ClassVar[tuple[str, ...]] = POST_TRAINING_SETTINGS

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


def training_config(config) -> dict:
    """The config as a resume checkpoint records and checks it: without the settings that only
    post-process the map or the score or change inference alone (training does not depend on
    them, so changing one, or resuming a checkpoint written before it existed, must not refuse
    the resume)."""
    return {k: v for k, v in config.to_dict().items() if k not in type(config).NOT_TRAINED}


# --- typed options -------------------------------------------------------------------------------

_TYPE_NAMES = {int: "int", float: "float", str: "text", bool: "true/false", "file": "file",
               "files": "files", "folder": "folder"}


@dataclass(frozen=True)
class Option:
    """A training option of a method (not a model setting: it is not stored in the config and
    does not change the graph): name, type, default, help.

    ``type``: int, float, str, bool, ``"file"`` / ``"folder"`` (a path, kept as text) or
    ``"files"`` (a tuple of paths). ``default`` None means "not given" (the method's code says
    what then happens, the help text too). ``flag``: the ``edgestad train`` flag that sets it
    (otherwise ``-o NAME=VALUE``)."""
    name: str
    type: Any
    default: Any = None
    help: str = ""
    choices: tuple = ()
    minimum: float | None = None
    flag: str | None = None

    @property
    def type_name(self) -> str:
        return "|".join(self.choices) if self.choices else _TYPE_NAMES.get(self.type, str(self.type))

    @property
    def how_to_set(self) -> str:
        return self.flag or f"-o {self.name}=VALUE"

    def parse(self, value):
        """The value converted to the option's type; MethodConfigError naming it otherwise."""
        if value is None:
            return None
        where = self.flag or f"option {self.name}"

        def bad(what):
            return MethodConfigError(f"{where}: expected {what}, got {value!r}")

        kind = self.type
        if kind is bool:
            if not isinstance(value, bool):
                raise bad("true or false")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad("an integer")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad("a number")
            value = float(value)
        elif kind == "files":
            items = (value,) if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                raise bad("file paths")
            value = tuple(items)
        elif not isinstance(value, str):          # str, "file", "folder"
            raise bad("text" if kind is str else f"a {kind} path")
        if self.choices and value not in self.choices:
            raise MethodConfigError(f"{where}: must be one of {', '.join(self.choices)}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise MethodConfigError(f"{where}: must be at least {self.minimum:g}, got {value!r}")
        return value

    def describe(self) -> str:
        default = "not set" if self.default is None else repr(self.default)
        return f"{self.name} ({self.type_name}, default {default}; {self.how_to_set}): {self.help}"


@dataclass
class TrainSettings:
    """Training settings every method understands; ``None`` = the method's own default."""
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    val_fraction: float = 0.2                     # 0.05 (n + 1) >= 1 from 95 good images on
    pixel_fpr: float = 0.001
    image_false_reject: float = 0.05               # k = floor(0.05 (n + 1)); 0: the largest
    review_false_reject: float | None = None      # a REVIEW band below the NG threshold
    roi: tuple[int, int, int, int] | None = None  # region of interest x, y, w, h (source pixels)
    defects: str | None = None                    # real defective images: image threshold by recall
    recall: float = 0.95
    seed: int = 0
    options: dict = field(default_factory=dict)   # the method's options (Method.options) as given


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
    # epochs, batch_size, lr
    defaults: dict = {}
    # A folder with many images needs fewer epochs for the same number of optimizer steps: when
    # set, the default epoch count is no more than reaches ``default_steps`` steps, and never
    # below ``min_epochs`` (``default_epochs``); None: always ``defaults["epochs"]``.
    default_steps: int | None = None
    min_epochs: int = 1
    # the training options this method understands (Option); the CLI refuses others for it
    options: tuple[Option, ...] = ()
    # named starting points: preset name → settings (``train --preset``)
    presets: dict[str, dict] = {}
    # Where the torch side lives, imported when a verb runs ("module:attribute"; a module name
    # starting with "." is relative to the method's package): the model class (config → model),
    # the training function (model, images, ctx, options → history), and optionally the
    # score statistics (model, images, boxes, device → stats) and the part maps (model, x → maps).
    model_class: str = ""
    train_function: str = ""
    statistics_function: str = ""
    parts_function: str = ""

    def _torch_side(self, target: str):
        import importlib
        import sys
        module, _, attribute = target.partition(":")
        package = sys.modules[type(self).__module__].__package__
        return getattr(importlib.import_module(module, package), attribute)

    # --- the verbs -----------------------------------------------------------------------------
    def build(self, config):
        return self._torch_side(self.model_class)(config)

    def fit(self, model, images, ctx: FitContext) -> list[dict]:
        train = self._torch_side(self.train_function)
        return train(model, images, ctx, self.resolve_options(ctx.options))

    # --- defaults ------------------------------------------------------------------------------
    def default_epochs(self, train_images: int, batch_size: int) -> int:
        """The epochs a training runs when ``--epochs`` is not given, for this many training
        images."""
        epochs = self.defaults["epochs"]
        if self.default_steps is None:
            return epochs
        per_epoch = max(1, math.ceil(train_images / batch_size))
        return max(self.min_epochs, min(epochs, math.ceil(self.default_steps / per_epoch)))

    def epochs_rule(self) -> str:
        """The default epoch count in words (what ``edgestad methods`` shows)."""
        epochs = self.defaults.get("epochs")
        if self.default_steps is None:
            return f"{epochs}"
        return (f"{epochs} (fewer for large folders: no more than reach {self.default_steps} "
                f"optimizer steps, at least {self.min_epochs})")

    def prepare(self, config, options: dict):
        return config

    def fit_score_statistics(self, model, images, boxes, device) -> dict:
        if not self.statistics_function:
            return {}
        return self._torch_side(self.statistics_function)(model, images, boxes, device)

    def parts(self, model, x) -> dict:
        return self._torch_side(self.parts_function)(model, x) if self.parts_function else {}

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

    def int8_fp16_feeds(self, config) -> tuple[str, ...]:
        """Module paths whose inputs the int8 graph must not quantize: the backbone layers that
        feed them run fp16 there. Default: the global branch's Gaussian, a Mahalanobis distance
        over about a thousand pooled teacher channels that adds up their int8 rounding noise
        (screw: its score correlated 0.952 with fp32's, the map's 0.9993)."""
        return ("global_gaussian",) if getattr(config, "global_branch", False) else ()

    def backbone_of(self, config) -> str:
        return getattr(config, "backbone", self.default_backbone)

    def tiny(self, workdir: Path) -> dict:
        """A tiny, fast instance: {"settings": config values, "options": options, "lr": a
        learning rate under which a few steps lower the loss (None: the method's)}. What the
        conformance test trains, resumes, letterboxes and exports for every method."""
        return {"settings": {"input_size": (64, 64)}, "options": {}, "lr": None}

    # --- settings and options: checked here, once ----------------------------------------------
    def setting_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls)]

    def make_config(self, **values):
        """The config from the given values (``None`` = default); unknown names are refused."""
        values = {k: v for k, v in values.items() if v is not None}
        known = set(self.setting_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise MethodConfigError(
                f"--{unknown[0].replace('_', '-')}: not a setting of method {self.name} "
                f"(its settings: {', '.join(sorted(known))})")
        return self.config_cls(**values)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    def resolve_options(self, given: dict, config=None) -> dict:
        """Every option of the method: the given values (typed, checked) and the defaults of the
        rest. Unknown names are refused, naming the method's options. With ``config``, the
        method's own cross-checks (``check_options``) run too."""
        unknown = sorted(set(given) - set(self.option_names))
        if unknown:
            raise MethodConfigError(f"option {unknown[0]!r}: not an option of method {self.name} "
                                    f"(its options: {', '.join(self.option_names) or 'none'})")
        resolved = {o.name: o.default if given.get(o.name) is None else o.parse(given[o.name])
                    for o in self.options}
        if config is not None:
            self.check_options(resolved, config)
        return resolved

    def check_options(self, options: dict, config) -> None:
        """A method's checks of its options against its config (MethodConfigError)."""

    def summary(self) -> str:
        return f"{self.title} [{self.paper}; default backbone: {self.default_backbone}]"
