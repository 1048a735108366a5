"""Methods behind one small interface: a config dataclass and an nn.Module that maps an image
batch (N×3×H×W, 0..255) to (anomaly map N×1×H×W, image score N). Export and runtime only rely on
that interface, so another method plugs in by adding an entry to METHODS."""
from __future__ import annotations

from .uninformed_students import StudentTeacherConfig, UninformedStudents

METHODS = {
    "uninformed_students": (StudentTeacherConfig, UninformedStudents),
}


def build_model(method: str, method_config: dict):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    config_cls, model_cls = METHODS[method]
    return model_cls(config_cls.from_dict(method_config))


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
