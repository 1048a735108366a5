"""TensorRT engines from the bundle's ONNX graphs, built on the device that will run them.

An engine is compiled for one GPU architecture and one TensorRT release, so it is named by both
(``model.fp16.Orin_sm87_trt10.3.0.engine``) and carries a JSON sidecar (same name, ``.json``)
that the runtime checks before loading it: gpu_name, compute_capability, tensorrt_version,
precision, the sha256 of the ONNX graph it came from, build settings and a verification result.

The network is *strongly typed* (TensorRT >= 9; always so in TensorRT 11): each layer runs in the
type the ONNX graph gives it, so the fp16/int8 decisions made in export/precision.py are exactly
what runs. TensorRT 8.6 (JetPack 6.0) has no strongly typed mode; there the graph's precision is
approximated with the FP16/INT8 builder flags and the sidecar says so.

The optimisation profile covers every graph input (``images``, and ``valid_box`` of a letterbox
graph, with the same batch range); a fresh engine is run by edgestad.runner's ``TrtRunner`` (which
feeds ``valid_box``) and compared with ONNX Runtime before it is written.

tensorrt and pycuda are imported lazily: this module imports (and its naming/sidecar helpers
work) on machines without them. NOTE: the build/run code follows the documented TensorRT 10/11
Python API; without a GPU it runs only against tests/trt_stub.py, a stand-in for that API.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgestad.runner import OrtRunner, RunnerError, TrtRunner, gpu_info  # noqa: F401 (gpu_info re-exported)

from .graph import INPUT_NAME, PRECISIONS, VALID_BOX_NAME

ENGINE_SUFFIX = ".engine"
# Largest max|engine - onnxruntime| / max|onnxruntime| accepted when verifying a fresh engine.
# fp32: kernels differ (TF32 is disabled); fp16/int8: GPU kernels round differently from the
# CPU provider's emulation. A larger difference means a broken engine, which is not written.
VERIFY_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}


class EngineBuildError(RuntimeError):
    """TensorRT could not parse, build or run the graph; the message carries the parser errors."""


# ------------------------------------------------------------------------------ availability


def tensorrt_status() -> tuple[bool, str]:
    """(True, description) when tensorrt, pycuda and a CUDA GPU are all here, else (False, why)."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising OSError on its .so
        return False, f"TensorRT is not installed here ({type(exc).__name__}: {exc})"
    try:
        import pycuda.driver as cuda
    except Exception as exc:
        return False, f"pycuda is not installed here ({type(exc).__name__}: {exc}); pip install pycuda"
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:
        return False, f"no usable CUDA driver/GPU ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "no CUDA GPU found"
    return True, f"TensorRT {trt.__version__}, {count} CUDA device(s)"


# ------------------------------------------------------------------------------ naming


def sanitize_gpu_name(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'NVIDIA-GeForce-RTX-4090' (safe in a plain bundle file name)."""
    text = re.sub(r"[^A-Za-z0-9_-]+", "-", name.strip())
    text = re.sub(r"-{2,}", "-", text).strip("-")
    return text or "GPU"


def engine_file_name(precision: str, gpu_name: str, compute_capability: str, tensorrt_version: str) -> str:
    """``model.<precision>.<gpu>_sm<cc>_trt<version>.engine``, e.g.
    ``model.fp16.NVIDIA-Orin_sm87_trt10.3.0.engine``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    cc = str(compute_capability).replace(".", "")
    if not cc.isdigit():
        raise ValueError(f"compute capability must look like '8.7', got {compute_capability!r}")
    version = re.sub(r"[^0-9.]", "", str(tensorrt_version)) or "unknown"
    return f"model.{precision}.{sanitize_gpu_name(gpu_name)}_sm{cc}_trt{version}{ENGINE_SUFFIX}"


def sidecar_file_name(engine_name: str) -> str:
    """``X.engine`` -> ``X.json`` (what the runtime looks for next to an engine)."""
    if not engine_name.endswith(ENGINE_SUFFIX):
        raise ValueError(f"engine file names end with {ENGINE_SUFFIX}: {engine_name!r}")
    return engine_name[: -len(ENGINE_SUFFIX)] + ".json"


def make_sidecar(*, precision: str, gpu: dict, onnx_file: str, onnx_sha256: str, input_shape,
                 batch: int, max_batch: int, workspace_mb: int, strongly_typed: bool,
                 verification: dict | None = None, built_at: str | None = None) -> dict:
    return {
        "engine_format": "tensorrt-plan",
        "gpu_name": gpu["gpu_name"],
        "compute_capability": gpu["compute_capability"],
        "tensorrt_version": gpu["tensorrt_version"],
        "precision": precision,
        "onnx": onnx_file,
        "onnx_sha256": onnx_sha256,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW",
                  "shape": [None, *[int(v) for v in input_shape]]},
        "profile": {"min_batch": 1, "opt_batch": int(batch), "max_batch": int(max_batch)},
        "workspace_mb": int(workspace_mb),
        "strongly_typed": bool(strongly_typed),
        "built_at": built_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verification": verification,
    }


def default_timing_cache(gpu: dict) -> Path:
    """Per-user persistent timing cache keyed by GPU and TensorRT version (a cache from another
    GPU or release is useless and TensorRT would reject it)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgestad" / "tensorrt"
    cc = gpu["compute_capability"].replace(".", "")
    return root / f"timing_{sanitize_gpu_name(gpu['gpu_name'])}_sm{cc}_trt{gpu['tensorrt_version']}.cache"


# ------------------------------------------------------------------------------ build


@dataclass
class BuiltEngine:
    plan: bytes
    strongly_typed: bool
    timing_cache: Path | None


def _logger():
    import tensorrt as trt
    return trt.Logger(trt.Logger.WARNING)


def _batch_profile(builder, network, input_shape, batch: int, max_batch: int):
    """One optimisation profile giving every graph input (``images``, and ``valid_box`` of a
    letterbox graph) the same batch range 1 .. ``max_batch``, tuned for ``batch``."""
    per_image = {INPUT_NAME: tuple(int(v) for v in input_shape), VALID_BOX_NAME: (4,)}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in per_image:
            raise EngineBuildError(f"graph input {name!r} is not in the edgestad graph contract "
                                   f"(expected {INPUT_NAME!r}, and {VALID_BOX_NAME!r} for letterbox)")
        shape = per_image[name]
        profile.set_shape(name, (1, *shape), (batch, *shape), (max_batch, *shape))
    return profile


def build_engine(onnx_bytes: bytes, precision: str, input_shape: tuple[int, int, int], *,
                 batch: int = 1, max_batch: int = 8, workspace_mb: int = 1024,
                 timing_cache: str | os.PathLike | None = None,
                 log: Callable[[str], None] = print) -> BuiltEngine:
    """Parse ``onnx_bytes`` and build a serialized engine with a batch profile
    (min 1, opt ``batch``, max ``max_batch``) and a persistent timing cache."""
    import tensorrt as trt

    if not 1 <= batch <= max_batch:
        raise ValueError(f"need 1 <= batch ({batch}) <= max_batch ({max_batch})")
    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError("TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 convolutions keep a 10-bit mantissa: an fp32 engine should compute in fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    if not strongly_typed:  # TensorRT 8.6: approximate the graph's precision with builder flags
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ graph: no calibrator needed

    config.add_optimization_profile(_batch_profile(builder, network, input_shape, batch, max_batch))

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = b""
    if cache_path is not None and cache_path.is_file():
        cache_bytes = cache_path.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):  # False: refuse a cache from another device
        log(f"  timing cache {cache_path} does not match this GPU/TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    log(f"  building {precision} engine (batch 1..{max_batch}, opt {batch}, workspace {workspace_mb} MiB"
        f"{', strongly typed' if strongly_typed else ', builder flags (TensorRT < 9)'}) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build the {precision} engine (see the TensorRT log above)")
    plan = bytes(memoryview(serialized))
    if cache_path is not None:
        from edgestad.files import atomic_write_bytes
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return BuiltEngine(plan, strongly_typed, cache_path)


# ------------------------------------------------------------------------------ verify


def verify_engine(plan: bytes, onnx_bytes: bytes, precision: str, images: np.ndarray,
                  threads: int | None = None, boxes: np.ndarray | None = None,
                  name: str = "the engine") -> dict:
    """Run the engine (TrtRunner) and ONNX Runtime (CPU) on the same images (and valid boxes of a
    letterbox graph; the full frame when None) and compare the maps."""
    from .parity import compare

    try:
        with TrtRunner(plan, label=name) as engine:
            engine_maps, engine_scores = engine.infer(images, boxes)
    except RunnerError as exc:
        raise EngineBuildError(str(exc)) from None
    with OrtRunner(onnx_bytes, threads=threads) as reference:
        ref_maps, ref_scores = reference.infer(images, boxes)
    result: dict[str, Any] = {"images": int(len(images)), "reference": "onnxruntime CPUExecutionProvider",
                              "valid_box": None if not engine.takes_valid_box else (
                                  "full frame" if boxes is None else "the images' letterbox boxes"),
                              **compare(engine_maps, engine_scores, ref_maps, ref_scores)}
    result["tolerance"] = VERIFY_TOLERANCE[precision]
    result["finite"] = bool(np.isfinite(engine_maps).all() and np.isfinite(engine_scores).all())
    result["passed"] = result["finite"] and result["max_rel_diff_map"] <= result["tolerance"]
    return result


def sidecar_json(sidecar: dict) -> bytes:
    return (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode("utf-8")
