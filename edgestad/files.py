"""Writing files so that nothing is lost: atomic replace, fsync, hashing while writing.

Torch-free and bundle-agnostic: the bundle writer, export, the runtime's event log, NG store,
station counters and users file all write through these.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

FileSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]
CHUNK = 1 << 20    # read/write in 1 MiB pieces (engines are large)


class JsonWriteError(ValueError):
    """An object that cannot be written as strict JSON (NaN, an unknown type); names the file."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of the file at ``path``, read in 1 MiB chunks (engines are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames/creations inside it survive a power cut."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, suffix: str = "tmp") -> Path:
    """A hidden, unique name beside ``path`` (the same filesystem, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{suffix}")


@contextmanager
def replacing(path: str | os.PathLike[str], sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; when the block ends without
    error the file there is fsynced and ``os.replace``\\ s ``path`` (then the folder is fsynced,
    unless the caller replaces several files and syncs the folder once); on any error it is
    removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o666) -> Path:
    """Atomically replace ``path`` with ``data``.

    Readers see either the old or the new content, never a torn file (see ``replacing``). New
    files get the usual umask-derived permissions (not mkstemp's 0600), so a service user can read
    them; ``mode=0o600`` keeps a secret (a users file) unreadable by others from its first byte.
    """
    with replacing(path) as tmp:
        write_new_file(tmp, bytes(data), mode)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as pretty JSON (indent 2, sorted keys, trailing newline).

    numpy scalars/arrays are converted to plain numbers/lists; NaN/Infinity are rejected because
    they are not valid JSON and other tools (and the runtime) would choke on them.
    """
    return atomic_write_bytes(path, json_bytes(obj, Path(path)))


def json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def json_bytes(obj: Any, where: Path) -> bytes:
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=json_default)
    except (TypeError, ValueError) as exc:
        raise JsonWriteError(f"{where}: cannot write it as JSON: {exc}") from exc
    return (text + "\n").encode("utf-8")


def write_new_file(dst: Path, src: FileSource, mode: int = 0o666) -> str:
    """Create ``dst`` (must not exist) from bytes or a source path, fsync it, return its sha256.

    Hashing while writing avoids reading large engines twice.
    """
    digest = hashlib.sha256()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        if isinstance(src, (bytes, bytearray, memoryview)):
            digest.update(src)
            out.write(src)
        else:
            with open(src, "rb") as fh:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
