"""The models ``edgestad bench`` times: a bundle's, random-weight models of each method, their
fused forms, and peers (EfficientAD-S) with the architecture of their papers."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

PEERS = ("efficientad-s",)


@dataclass
class Subject:
    """One model to time: its torch module, where it came from, and its ONNX graphs."""
    name: str
    model: object                        # torch.nn.Module mapping uint8 N×3×H×W → (map, score)
    source: str
    method: str
    method_config: dict = field(default_factory=dict)
    fused: bool = False
    onnx: dict = field(default_factory=dict)   # precision → path of an existing graph


def random_model(method: str, config: dict, seed: int = 0):
    """A method's model with random weights (cost does not depend on the weights)."""
    import torch
    from edgestad.methods import build_model
    torch.manual_seed(seed)
    return build_model(method, config).eval()


def random_uninformed_students(config: dict, seed: int = 0):
    return random_model("uninformed_students", config, seed)


def bundle_model(bundle_path: Path, dense_stride: int | None = None):
    """(model, manifest, bundle) of a bundle; ``dense_stride`` overrides the inference stride."""
    from edgestad.bundle import load_bundle
    from edgestad.methods import build_model, load_model
    import torch
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    if dense_stride is None or dense_stride == manifest["method_config"].get("dense_stride"):
        return load_model(bundle), manifest, bundle
    # The dense stride is an inference-time lever: same weights, other sampling of the same map.
    config = dict(manifest["method_config"], dense_stride=dense_stride)
    model = build_model(manifest["method"], config)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in bundle.weights().items()})
    manifest = dict(manifest, method_config=config)
    return model.eval(), manifest, None


def peer_model(name: str, input_size: tuple[int, int], seed: int = 0):
    import torch
    if name == "efficientad-s":
        from edgestad.bench.efficientad import EfficientADS
        torch.manual_seed(seed)
        try:
            return EfficientADS(input_size).eval()
        except ValueError as exc:
            raise click.UsageError(f"--peer {name}: {exc}") from None
    raise click.BadParameter(f"unknown peer {name!r}; known: {', '.join(PEERS)}",
                             param_hint="--peer")


def build_subjects(bundle, patch_sizes, students, descriptor_dim, width, dense_stride,
                   input_size, fused, peers, seed, method="uninformed_students"
                   ) -> tuple[list[Subject], tuple[int, int]]:
    """The models to time: a bundle's, or one random-weight model per method (``method`` is a
    name or a list of names; Uninformed Students' options -p/--width/... shape its model), then
    fused forms and peers."""
    bases = []
    if bundle is not None:
        model, manifest, loaded = bundle_model(bundle, dense_stride)
        size = input_size or (manifest["input"]["height"], manifest["input"]["width"])
        onnx = {}
        if loaded is not None:          # the bundle's own exported graphs, when it has them
            from edgestad.runtime.backends import DEFAULT_ONNX_FILES
            named = (manifest.get("exports") or {}).get("onnx") or {}
            for precision, default in DEFAULT_ONNX_FILES.items():
                name = named.get(precision, default)
                if isinstance(name, str) and (loaded.path / name).is_file():
                    onnx[precision] = loaded.file(name)
        bases.append(Subject("ours", model, f"bundle {bundle}", manifest["method"],
                             manifest["method_config"], onnx=onnx))
    else:
        from edgestad.methods import get_method
        size = input_size or (256, 256)
        names = [method] if isinstance(method, str) else list(method)
        for name in names:
            label = "ours" if len(names) == 1 else name
            if name == "uninformed_students":
                config = {"patch_sizes": list(patch_sizes or (17, 33, 65)),
                          "num_students": students or 3, "descriptor_dim": descriptor_dim or 128,
                          "width": width or 128, "dense_stride": dense_stride or 1,
                          "input_size": list(size)}
                try:
                    model = random_uninformed_students(config, seed)
                except ValueError as exc:
                    raise click.UsageError(str(exc)) from None
                bases.append(Subject(label, model, "random weights", name, model.config.to_dict()))
            else:
                config = get_method(name).make_config(input_size=tuple(size)).to_dict()
                bases.append(Subject(label, random_model(name, config, seed), "random weights",
                                     name, config))
    subjects = []
    for base in bases:
        if fused in ("no", "both"):
            subjects.append(base)
        if fused in ("yes", "both"):
            from edgestad.methods import get_method
            forms = get_method(base.method).deploy_forms()
            if "fused" not in forms:
                if len(bases) == 1:
                    raise click.UsageError(f"--fused: method {base.method} has no fused form")
                if fused == "yes":
                    subjects.append(base)
                continue
            subjects.append(Subject(f"{base.name}-fused", forms["fused"](base.model), base.source,
                                    base.method, base.method_config, fused=True))
    for name in peers:
        subjects.append(Subject(name, peer_model(name, size, seed),
                                "random weights (architecture of the paper)", "peer",
                                {"input_size": list(size)}))
    return subjects, tuple(size)
