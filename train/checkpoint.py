"""Training checkpoints (resume after an interruption) and teacher weight files.

Resume checkpoints hold optimizer and RNG state, so they use torch.save, loaded back with
``weights_only=True`` (no arbitrary unpickling). Teachers and bundles use safetensors only.
Every write goes to a temporary file that is fsync'd and then renamed over the target.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file



def _atomic(path: Path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)     # mkstemp creates 0600; a service user must be able to read it
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointMismatch(ValueError):
    """The resume checkpoint in --out's .partial folder belongs to another configuration."""


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, expect: dict | None = None) -> dict:
    """Load a resume checkpoint; refuse one written for a different kind or configuration."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"{path}: cannot read the resume checkpoint ({exc}); delete it to start "
                           f"over") from exc
    for key, value in (expect or {}).items():
        if state.get(key) != value:
            raise CheckpointMismatch(f"{path}: the checkpoint was written with a different {key} "
                               f"({state.get(key)!r} vs {value!r}); use another output folder "
                               f"or delete it to start over")
    return state


def save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> None:
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               .detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
