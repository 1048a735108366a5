"""The method registry, filled from the method folders and the ``edgestad.methods`` entry points.

A method is a folder here (any sub-package but ``common``) whose ``__init__.py`` declares its
``Method`` with ``@register``, or a package of the user's that names itself in the entry-point
group ``edgestad.methods`` (``name = "module"`` or ``name = "module:MethodClass"``). Nothing is
listed by hand: ``method_names()`` finds them without importing any; ``get_method(name)``
imports one (its declaration only: a method's model is imported when it is built), and
``list_methods()`` all of them. ``build_model`` and ``load_model`` turn a bundle's manifest back
into its torch model.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from .base import Method, MethodConfigError

ENTRY_POINT_GROUP = "edgestad.methods"
SHARED = ("common",)            # folders here that hold shared pieces, not a method
DEFAULT_METHOD = "stfpm"

_REGISTRY: dict[str, Method] = {}
# name → "module" or "module:attribute"; filled on first use by _discover()
_METHOD_MODULES: dict[str, str] = {}
_discovered = False


def register(cls):
    """Class decorator: register a Method subclass under ``cls.name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> dict[str, str]:
    global _discovered
    if not _discovered:
        found = {info.name: f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)
                 if info.ispkg and info.name not in SHARED and not info.name.startswith("_")}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found.setdefault(ep.name, ep.value)     # a folder here keeps its name
        for name, target in found.items():
            _METHOD_MODULES.setdefault(name, target)
        _discovered = True
    return _METHOD_MODULES


def _load(name: str, target: str) -> None:
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name.strip())
    if attribute:
        obj = getattr(module, attribute.strip())
        if isinstance(obj, type) and issubclass(obj, Method) and obj.name not in _REGISTRY:
            register(obj)
    if name not in _REGISTRY:
        raise MethodConfigError(f"method {name!r}: {target} registers no method of that name "
                                f"(its Method class needs name = {name!r} and @register)")


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        modules = _discover()
        if name not in modules:
            raise MethodConfigError(f"--method: unknown method {name!r}; known: "
                                    f"{', '.join(sorted(modules))}")
        _load(name, modules[name])
    return _REGISTRY[name]


def method_names() -> list[str]:
    """Every method's name without importing any: the default, the other built-in ones
    (alphabetically), then those of installed packages."""
    modules = _discover()
    builtin = sorted(n for n, t in modules.items() if t.startswith(f"{__name__}."))
    builtin.sort(key=lambda n: n != DEFAULT_METHOD)
    return builtin + sorted(n for n in modules if n not in builtin)


def list_methods() -> list[Method]:
    return [get_method(name) for name in method_names()]


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
