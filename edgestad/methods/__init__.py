"""The method registry: every method registers itself by name (``@register``).

``get_method(name)`` returns the Method object, ``list_methods()`` all of them; ``build_model``
and ``load_model`` turn a bundle's manifest back into its torch model. Adding a method = one
folder under ``edgestad/methods/`` + its name in ``_METHOD_MODULES``; nothing else changes.
"""
from __future__ import annotations

import importlib

from .base import Method, MethodConfigError

_REGISTRY: dict[str, Method] = {}
# Imported lazily so `edgestad methods` and the torch-free parts never pay for every model.
_METHOD_MODULES = {
    "stfpm": "edgestad.methods.stfpm",
    "resnet_students": "edgestad.methods.resnet_students",
    "uninformed_students": "edgestad.methods.uninformed_students",
    "rstpm": "edgestad.methods.rstpm",
    "stfpm_ae": "edgestad.methods.stfpm_ae",
}
DEFAULT_METHOD = "stfpm"


def register(cls):
    """Class decorator: register a Method subclass under ``cls.name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in _METHOD_MODULES:
        raise MethodConfigError(f"--method: unknown method {name!r}; known: {', '.join(sorted(_METHOD_MODULES))}")
    if name not in _REGISTRY:
        importlib.import_module(_METHOD_MODULES[name])
    return _REGISTRY[name]


def method_names() -> list[str]:
    return list(_METHOD_MODULES)


def list_methods() -> list[Method]:
    return [get_method(name) for name in _METHOD_MODULES]


def build_model(method: str, method_config: dict):
    m = get_method(method)
    return m.build(m.config_cls.from_dict(method_config))


def load_model(bundle, device="cpu"):
    """The torch model of a loaded bundle (edgestad.bundle.Bundle or a path)."""
    import torch
    from edgestad.bundle import Bundle, load_bundle
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    model = build_model(bundle.manifest["method"], bundle.manifest["method_config"])
    state = {k: torch.from_numpy(v.copy()) for k, v in bundle.weights().items()}
    model.load_state_dict(state)
    return model.eval().to(device)
