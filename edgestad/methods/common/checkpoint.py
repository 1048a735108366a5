"""Training checkpoints (resume after an interruption) and weight files written while training.

Resume checkpoints hold optimizer and RNG state, so they use torch.save, loaded back with
``weights_only=True`` (no arbitrary unpickling). Teachers and bundles use safetensors only.
Every write replaces its file atomically (``edgestad.files``).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from edgestad.files import atomic_write_bytes


class CheckpointMismatch(ValueError):
    """The resume checkpoint in --out's .partial folder belongs to another configuration."""


def _write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write(path, buffer.getvalue())


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
    from safetensors.torch import save
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               .detach().contiguous().cpu() for k, v in tensors.items()}
    _write(path, save(tensors, metadata=metadata))
