"""Which teacher each scale uses: the user's files (--teacher) or the ones shipped in the package."""
from __future__ import annotations

from pathlib import Path



def shipped_teacher_path(patch_size: int) -> Path:
    import edgestad
    return Path(edgestad.__file__).parent / "teachers" / f"teacher_p{patch_size}.safetensors"


def resolve_teachers(patch_sizes, user_paths=()) -> dict[int, Path]:
    """p → teacher file. User files are matched to scales by the patch size in their metadata."""
    from .checkpoint import read_teacher_file
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
