"""Inference backends behind one small interface, for the runtime.

Every backend runs the bundle's exported graph, whose I/O contract is fixed:
input ``images`` uint8 N x 3 x H x W (RGB) (+ ``valid_box`` float32 N x 4 for letterbox bundles),
outputs ``anomaly_map`` float32 N x 1 x H x W and ``image_score`` float32 N (edgestad.contract).
``Backend.infer(batch, boxes=None) -> (maps N x H x W, scores N)``.

The inference itself is edgestad.runner's (the one runner export, evaluate and bench use too);
this module adds what the runtime needs around it:

- ``OnnxRuntimeBackend``: ONNX Runtime with the TensorRT EP, CUDA EP, CPU EP, in that order,
  whichever this onnxruntime build offers (TensorRT EP engine cache, thread count).
- ``TensorRTBackend``: a serialized TensorRT engine (``TrtRunner``: tensorrt + pycuda, imported
  lazily: they exist only on GPU machines), refused before loading when its sidecar says it was
  built for another GPU or TensorRT version.

``select_backend`` picks one for a bundle (``auto``: a TensorRT engine built for this very GPU and
TensorRT version if there is one, else ONNX Runtime) and says why.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from .errors import BackendError

log = logging.getLogger("edgestad.runtime.backends")

from edgestad.contract import (INPUT_NAME, MAP_NAME, ONNX_FILES, PRECISIONS,  # noqa: F401
                               SCORE_NAME, VALID_BOX_NAME)
from edgestad.files import sha256_file as file_sha256
from edgestad.runner import (RUN_BACKENDS, OrtRunner, RunnerError, TrtRunner, canonical_backend,
                             gpu_info, import_tensorrt)
ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# Conventional file names when a manifest has no ``exports`` section (export writes these).
DEFAULT_ONNX_FILES = ONNX_FILES


class Backend(Protocol):
    name: str  # e.g. "onnxruntime:CPUExecutionProvider" or "tensorrt"
    precision: str
    input_shape: tuple[int, int, int]  # (3, H, W)
    model_file: Path
    model_sha256: str

    def infer(self, batch: np.ndarray, boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 3, H, W) [+ valid boxes (N, 4)] -> (maps float32 (N, H, W), scores float32 (N,))."""

    def close(self) -> None: ...


class _RunnerBackend:
    """A runner's inference with the runtime's error type."""

    runner: Any

    def infer(self, batch: np.ndarray, boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self.runner.infer(batch, boxes)
        except RunnerError as exc:
            raise BackendError(str(exc)) from None

    def close(self) -> None:
        self.runner.close()


def _activated(runner):
    try:
        return runner.activate()
    except RunnerError as exc:
        raise BackendError(str(exc)) from None


# --------------------------------------------------------------------------- ONNX Runtime


def ort_available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def ort_providers_in_order(available: Sequence[str] | None = None) -> list[str]:
    """TensorRT EP, CUDA EP, CPU EP: those this onnxruntime build has, best first."""
    available = ort_available_providers() if available is None else list(available)
    chosen = [p for p in ORT_PROVIDER_ORDER if p in available]
    return chosen or ["CPUExecutionProvider"]


class OnnxRuntimeBackend(_RunnerBackend):
    def __init__(
        self,
        onnx_path: str | os.PathLike,
        *,
        precision: str = "fp32",
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        trt_cache_dir: str | os.PathLike | None = None,
        sha256: str | None = None,
    ):
        self.model_file = Path(onnx_path)
        if not self.model_file.is_file():
            raise BackendError(f"ONNX graph not found: {self.model_file}")
        self.precision = precision
        providers = list(providers) if providers else ort_providers_in_order()
        provider_args: list[Any] = []
        for p in providers:
            if p == "TensorrtExecutionProvider":
                cache = Path(trt_cache_dir or default_cache_dir() / "ort-trt")
                opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
                # Precision lives in the graph; TensorRT still needs leave to use FP16/INT8 kernels.
                if precision == "fp16":
                    opts["trt_fp16_enable"] = True
                if precision == "int8":
                    opts["trt_int8_enable"] = True
                try:
                    cache.mkdir(parents=True, exist_ok=True)
                except OSError:
                    opts["trt_engine_cache_enable"] = False
                provider_args.append((p, opts))
            else:
                provider_args.append(p)
        if not intra_op_threads and providers[0] == "CPUExecutionProvider":
            # Leave one core to the capture thread (decode + resize): measured on 2 cores, ORT's
            # default of all cores made the whole pipeline 20 % slower than bare inference,
            # cores - 1 brought it under 10 % (studies/runtime_overhead.py).
            intra_op_threads = max(1, (os.cpu_count() or 1) - 1)
        self.intra_op_threads = intra_op_threads
        self.runner = _activated(OrtRunner(self.model_file, threads=intra_op_threads,
                                           providers=provider_args, quiet=False))
        self.providers = self.runner.providers
        self.name = self.runner.name
        self.input_shape = self.runner.input_shape
        self.model_sha256 = sha256 or file_sha256(self.model_file)


# --------------------------------------------------------------------------- TensorRT


@dataclass
class EngineEntry:
    path: Path
    sidecar: dict = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return str(self.sidecar.get("precision", "")).lower()


def _version_tuple(v: Any, n: int = 3) -> tuple[int, ...]:
    parts = []
    for piece in str(v).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts[:n])


def _cc_text(cc: Any) -> str:
    if isinstance(cc, (list, tuple)):
        return ".".join(str(int(x)) for x in cc)
    return str(cc).strip()


def engine_compat_problems(sidecar: Mapping[str, Any], running: Mapping[str, Any]) -> list[str]:
    """Why an engine built as ``sidecar`` describes cannot run on ``running`` (empty: it can).

    ``running`` has ``gpu_name``, ``compute_capability`` and ``tensorrt_version``. A TensorRT
    engine is compiled for one GPU architecture and one TensorRT release; loading it elsewhere
    fails or, worse, crashes deep inside the runtime, so the sidecar is checked first.
    """
    problems = []
    built_cc, run_cc = _cc_text(sidecar.get("compute_capability", "")), _cc_text(running["compute_capability"])
    if not built_cc:
        problems.append("sidecar has no compute_capability")
    elif built_cc != run_cc:
        problems.append(
            f"built for compute capability {built_cc} ({sidecar.get('gpu_name', '?')}), "
            f"this GPU is {run_cc} ({running.get('gpu_name', '?')})"
        )
    built_trt, run_trt = sidecar.get("tensorrt_version"), running["tensorrt_version"]
    if not built_trt:
        problems.append("sidecar has no tensorrt_version")
    elif _version_tuple(built_trt) != _version_tuple(run_trt):
        problems.append(f"built with TensorRT {built_trt}, this machine has TensorRT {run_trt}")
    return problems


def list_engines(bundle_dir: Path, manifest: Mapping[str, Any]) -> list[EngineEntry]:
    """TensorRT engines of a bundle with their JSON sidecars.

    The manifest's ``exports.engines`` is read in any of the shapes export may write (a list of
    file names, a list of objects with a ``file``/``path``/``engine`` key, or a mapping to file
    names); ``*.engine`` files in the bundle folder are added so a hand-copied engine is found too.
    The sidecar is ``<name>.json`` next to ``<name>.engine`` (or ``<name>.engine.json``).
    """
    names: list[str] = []
    inline: dict[str, dict] = {}
    entries = (manifest.get("exports") or {}).get("engines") or []
    if isinstance(entries, Mapping):
        entries = list(entries.values())
    for item in entries:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, Mapping):
            name = item.get("file") or item.get("path") or item.get("engine")
            if name:
                names.append(str(name))
                inline[str(name)] = {k: v for k, v in item.items() if k not in ("file", "path", "engine")}
    for p in sorted(bundle_dir.glob("*.engine")):
        if p.name not in names:
            names.append(p.name)
    found = []
    for name in names:
        path = bundle_dir / name
        sidecar = dict(inline.get(name, {}))
        for candidate in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
            if candidate.is_file():
                try:
                    sidecar.update(json.loads(candidate.read_text()))
                except (OSError, ValueError) as exc:
                    log.warning("ignoring unreadable engine sidecar %s: %s", candidate, exc)
                break
        if isinstance(sidecar.get("sidecar"), str):
            side = bundle_dir / sidecar["sidecar"]
            if side.is_file():
                sidecar.update(json.loads(side.read_text()))
        found.append(EngineEntry(path, sidecar))
    return found


def tensorrt_importable() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda"))


class TensorRTBackend(_RunnerBackend):
    """A bundle's TensorRT engine, checked against its sidecar before it is loaded.

    Not exercised on real hardware on the development machine (TensorRT cannot be installed
    there); tests/trt_stub.py stands in for tensorrt + pycuda.
    """

    def __init__(self, engine: EngineEntry, sha256: str | None = None, device: int = 0):
        try:
            import_tensorrt()
        except RunnerError as exc:
            raise BackendError(f"{exc}, or use --backend onnxruntime") from None
        self.model_file = engine.path
        if not engine.path.is_file():
            raise BackendError(f"TensorRT engine not found: {engine.path}")
        running = gpu_info(device)
        problems = engine_compat_problems(engine.sidecar, running)
        if problems:
            raise BackendError(f"{engine.path.name} cannot run here: " + "; ".join(problems))
        if engine.sidecar.get("gpu_name") and engine.sidecar["gpu_name"] != running["gpu_name"]:
            log.warning(
                "%s was built on %s, running on %s (same architecture, so it loads; rebuild for best speed)",
                engine.path.name, engine.sidecar["gpu_name"], running["gpu_name"],
            )
        self.precision = engine.precision or "unknown"
        self.name = "tensorrt"
        self.running = running
        self.runner = _activated(TrtRunner(engine.path, device=device))
        self.input_shape = self.runner.input_shape
        self.max_batch = self.runner.max_batch
        self.takes_valid_box = self.runner.takes_valid_box
        self.model_sha256 = sha256 or file_sha256(self.model_file)

    def infer(self, batch: np.ndarray, boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if len(batch) > self.max_batch:  # the runtime serves one call per batch: no splitting
            raise BackendError(f"batch {len(batch)} exceeds the engine's maximum batch {self.max_batch}")
        return super().infer(batch, boxes)


# --------------------------------------------------------------------------- selection


def default_cache_dir() -> Path:
    base = os.environ.get("EDGESTAD_CACHE_DIR") or os.environ.get("CACHE_DIRECTORY")  # systemd CacheDirectory=
    if base:
        return Path(base.split(":")[0])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgestad"


def onnx_files(bundle_dir: Path, manifest: Mapping[str, Any]) -> dict[str, Path]:
    """precision -> ONNX file that exists in the bundle."""
    exports = manifest.get("exports") or {}
    listed = exports.get("onnx")
    mapping: dict[str, str] = {}
    if isinstance(listed, Mapping):
        for prec, entry in listed.items():
            if isinstance(entry, str):
                mapping[str(prec)] = entry
            elif isinstance(entry, Mapping) and (entry.get("file") or entry.get("path")):
                mapping[str(prec)] = str(entry.get("file") or entry.get("path"))
    elif isinstance(listed, str):
        mapping["fp32"] = listed
    for prec, name in DEFAULT_ONNX_FILES.items():
        mapping.setdefault(prec, name)
    return {p: bundle_dir / n for p, n in mapping.items() if (bundle_dir / n).is_file()}


def _manifest_hash(manifest: Mapping[str, Any], path: Path) -> str | None:
    files = manifest.get("files") or {}
    value = files.get(path.name)
    if isinstance(value, Mapping):
        value = value.get("sha256")
    return value if isinstance(value, str) else None


def _pick_precision(available: Sequence[str], wanted: str | None, gpu: bool, what: str) -> str:
    if wanted:
        if wanted not in PRECISIONS:
            raise BackendError(f"unknown precision {wanted!r}; choose one of {PRECISIONS}")
        if wanted not in available:
            raise BackendError(f"no {wanted} {what} in the bundle (available: {sorted(available) or 'none'})")
        return wanted
    # FP16 on a GPU (the accuracy cost is measured at export); FP32 on CPU, where FP16 is slower.
    # INT8 only when asked for: its accuracy cost depends on the calibration set.
    order = ("fp16", "fp32", "int8") if gpu else ("fp32", "fp16", "int8")
    for p in order:
        if p in available:
            return p
    raise BackendError(f"the bundle has no {what}")


def select_backend(
    bundle_dir: str | os.PathLike,
    manifest: Mapping[str, Any],
    name: str = "auto",
    precision: str | None = None,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    trt_cache_dir: str | os.PathLike | None = None,
) -> Backend:
    """The backend for ``bundle_dir``: ``auto``, ``tensorrt`` or ``onnxruntime``."""
    bundle_dir = Path(bundle_dir)
    try:
        name = canonical_backend(name, RUN_BACKENDS)
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    reasons = []
    if name in ("auto", "tensorrt"):
        engines = list_engines(bundle_dir, manifest)
        if not engines:
            reasons.append("the bundle has no TensorRT engine")
        elif not tensorrt_importable():
            reasons.append("tensorrt/pycuda are not installed")
        else:
            backend, why = _try_engines(engines, manifest, precision)
            if backend is not None:
                return backend
            reasons.extend(why)
        if name == "tensorrt":
            raise BackendError("TensorRT backend unavailable: " + "; ".join(reasons))
        log.info("not using TensorRT: %s", "; ".join(reasons))
    available = ort_providers_in_order() if providers is None else list(providers)
    files = onnx_files(bundle_dir, manifest)
    if not files:
        raise BackendError(f"{bundle_dir}: no ONNX graph (model.onnx) and no usable TensorRT engine; run `edgestad export` first")
    gpu = any(p in GPU_PROVIDERS for p in available)
    prec = _pick_precision(list(files), precision, gpu, "ONNX graph")
    path = files[prec]
    return OnnxRuntimeBackend(
        path,
        precision=prec,
        providers=available,
        intra_op_threads=intra_op_threads,
        trt_cache_dir=trt_cache_dir,
        sha256=_manifest_hash(manifest, path),
    )


def _try_engines(engines: list[EngineEntry], manifest, precision):
    why = []
    by_prec: dict[str, list[EngineEntry]] = {}
    for e in engines:
        by_prec.setdefault(e.precision or "unknown", []).append(e)
    try:
        prec = _pick_precision([p for p in by_prec if p in PRECISIONS], precision, True, "TensorRT engine")
    except BackendError as exc:
        return None, [str(exc)]
    for entry in by_prec[prec]:
        try:
            return TensorRTBackend(entry, sha256=_manifest_hash(manifest, entry.path)), []
        except BackendError as exc:
            why.append(str(exc))
    return None, why
