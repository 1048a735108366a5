"""Teacher files: which teacher each scale uses (the user's files given with --teacher, or the
ones shipped in ``shipped_teachers/``), and reading them (safetensors + JSON metadata)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from .patchnet import PatchNet


def shipped_teacher_path(patch_size: int) -> Path:
    return Path(__file__).parent / "shipped_teachers" / f"teacher_p{patch_size}.safetensors"


def resolve_teachers(patch_sizes, user_paths=()) -> dict[int, Path]:
    """p → teacher file. User files are matched to scales by the patch size in their metadata."""
    chosen: dict[int, Path] = {}
    for path in user_paths:
        _, meta = read_teacher_file(Path(path))
        p = int(meta["config"]["patch_size"])
        if p in chosen:
            raise ValueError(f"--teacher: two teachers for p={p}: {chosen[p]} and {path}")
        chosen[p] = Path(path)
    for p in patch_sizes:
        if p not in chosen:
            shipped = shipped_teacher_path(p)
            if not shipped.is_file():
                raise FileNotFoundError(
                    f"no teacher for p={p}: none shipped at {shipped}; pretrain one with "
                    f"'edgestad pretrain-teacher IMAGES --out DIR -p {p}' and pass --teacher")
            chosen[p] = shipped
    unused = set(chosen) - set(patch_sizes)
    if unused:
        raise ValueError(f"--teacher given for p={sorted(unused)} but the model's scales are "
                         f"{list(patch_sizes)}")
    return {p: chosen[p] for p in patch_sizes}


def read_teacher_file(path: Path) -> tuple[dict, dict]:
    """(state dict as float32 tensors, metadata) of a teacher .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{path}: not a safetensors teacher file ({exc})") from exc
    if "edgestad" not in raw:
        raise ValueError(f"{path}: no edgestad teacher metadata in this safetensors file")
    return state, json.loads(raw["edgestad"])


def load_teacher(path: Path) -> tuple[PatchNet, dict]:
    """A PatchNet from a teacher file written by `edgestad pretrain-teacher`."""
    state, meta = read_teacher_file(path)
    c = meta["config"]
    net = PatchNet(c["patch_size"], c["descriptor_dim"], c["width"], c["leaky_slope"])
    net.load_state_dict(state)
    return net.eval(), meta


def write_teacher_file(path: Path, teacher: PatchNet, meta: dict) -> Path:
    """A teacher file: the weights and the metadata (``config``: patch_size, descriptor_dim,
    width, leaky_slope; ``iterations``; ``pretrained_cnn``: {name, ...}) as JSON."""
    from ..common.checkpoint import save_safetensors
    save_safetensors(path, teacher.state_dict(), {"edgestad": json.dumps(meta)})
    return Path(path)


def write_random_teacher(path: Path, patch_size: int, descriptor_dim: int, width: int,
                         seed: int = 0) -> Path:
    """An untrained (randomly initialised) teacher file: for smoke tests of the whole flow, not
    for detecting anything."""
    import torch
    with torch.random.fork_rng():          # the caller's global RNG stays where it was
        torch.manual_seed(seed)
        net = PatchNet(patch_size, descriptor_dim, width)
    config = {"patch_size": patch_size, "descriptor_dim": descriptor_dim, "width": width,
              "leaky_slope": net.leaky_slope}
    return write_teacher_file(path, net, {"kind": "edgestad-teacher", "config": config,
                                          "iterations": 0, "pretrained_cnn": {"name": "none (random)"}})
