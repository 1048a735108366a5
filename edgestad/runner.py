"""Runs an exported graph, torch-free: ``Runner`` (activate / infer / close) with ``OrtRunner``
(ONNX Runtime) and ``TrtRunner`` (a serialized TensorRT engine through tensorrt + pycuda).

Every place that runs a graph goes through these: export (parity, accuracy cost, engine
verification), ``evaluate --backend onnx``, ``bench`` and the runtime's backends. A runner checks
the graph's inputs and outputs against edgestad.contract when it is activated, feeds
``valid_box`` whenever the graph takes it (the full frame when no boxes are given) and runs at
most ``batch_size`` images per call (default: the engine's largest batch, else all of them):

    with OrtRunner("model.onnx") as runner:
        maps, scores = runner.infer(images)        # uint8 N x 3 x H x W -> N x H x W, N

This module also holds the one backend vocabulary of ``evaluate --backend``, ``bench --backends``
and ``run --backend``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .contract import INPUT_NAME, MAP_NAME, PRECISIONS, SCORE_NAME, VALID_BOX_NAME

# ------------------------------------------------------------------------------ vocabulary

# What runs the model. A name may end in a precision (bench's ``ort-fp16``, ``torch-cuda-fp16``).
BACKENDS = {
    "auto": "a TensorRT engine built for this GPU and TensorRT version, else ONNX Runtime",
    "onnxruntime": "an exported ONNX graph through ONNX Runtime",
    "tensorrt": "a TensorRT engine",
    "torch": "the PyTorch model",
    "torch-cuda": "the PyTorch model captured in a CUDA graph",
}
BACKEND_ALIASES = {"onnx": "onnxruntime", "ort": "onnxruntime"}
# The names each command writes (and reports); every alias spelling of them is accepted too.
RUN_BACKENDS = ("auto", "onnxruntime", "tensorrt")
EVALUATE_BACKENDS = ("torch", "onnx")
BENCH_BACKENDS = ("torch", "ort-fp32", "ort-fp16", "ort-int8", "torch-cuda", "torch-cuda-fp16",
                  "tensorrt")


def parse_backend(name: str) -> tuple[str, str | None]:
    """``"ort-fp16"`` -> ``("onnxruntime", "fp16")``, ``"onnx"`` -> ``("onnxruntime", None)``."""
    base, precision = str(name).strip().lower(), None
    for p in PRECISIONS:
        if base.endswith("-" + p):
            base, precision = base[: -len(p) - 1], p
    base = BACKEND_ALIASES.get(base, base)
    if base not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    return base, precision


def backend_spellings(accepted: Sequence[str]) -> list[str]:
    """Every name that means one of ``accepted`` (``"onnx"`` -> onnx, onnxruntime, ort)."""
    out = []
    for name in accepted:
        base, precision = parse_backend(name)
        suffix = f"-{precision}" if precision else ""
        aliases = [alias for alias, meant in BACKEND_ALIASES.items() if meant == base]
        for spelling in (name, *(s + suffix for s in (base, *aliases))):
            if spelling not in out:
                out.append(spelling)
    return out


def canonical_backend(name: str, accepted: Sequence[str]) -> str:
    """The spelling in ``accepted`` that means the same backend as ``name``; ValueError if none."""
    try:
        wanted = parse_backend(name)
    except ValueError:
        wanted = None
    for candidate in accepted:
        if parse_backend(candidate) == wanted:
            return candidate
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(accepted)}")


# ------------------------------------------------------------------------------ runners


class RunnerError(RuntimeError):
    """A graph or engine cannot be loaded or run here; the message says which and why."""


class Runner:
    """activate() -> infer(images, boxes=None) -> close(); also a context manager."""

    name = "runner"

    def __init__(self, label: str, batch_size: int | None = None):
        self.label = label                   # names the graph/engine in messages
        self.batch_size = batch_size
        self.input_shape: tuple[int, int, int] | None = None   # (3, H, W), set by activate()
        self.takes_valid_box = False
        self.max_batch: int | None = None
        self.active = False

    def activate(self) -> "Runner":
        if not self.active:
            self._activate()
            self.active = True
        return self

    def close(self) -> None:
        if self.active:
            self.active = False
            self._close()

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, images: np.ndarray, boxes: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 N x 3 x H x W [+ valid boxes N x 4] -> (maps float32 N x H x W, scores float32 N)."""
        self.activate()
        images = self._check_images(images)
        n = len(images)
        if self.takes_valid_box:
            if boxes is None:
                boxes = np.tile(np.array([0, 0, *self.input_shape[1:]], np.float32), (n, 1))
            boxes = np.ascontiguousarray(boxes, dtype=np.float32)
            if boxes.shape != (n, 4):
                raise RunnerError(f"{self.name}: valid boxes must be ({n}, 4), got {boxes.shape}")
        else:
            boxes = None
        step = self.batch_size or self.max_batch or max(n, 1)
        maps, scores = [], []
        for start in range(0, n, step):
            part = None if boxes is None else boxes[start:start + step]
            out_map, out_score = self._infer(images[start:start + step], part)
            maps.append(out_map.reshape(-1, *out_map.shape[-2:]))
            scores.append(out_score.reshape(-1))
        if len(maps) == 1:
            return maps[0].astype(np.float32, copy=False), scores[0].astype(np.float32, copy=False)
        return np.concatenate(maps).astype(np.float32), np.concatenate(scores).astype(np.float32)

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        shape = self.input_shape
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise RunnerError(f"{self.name}: input must be uint8 (N, {shape[0]}, {shape[1]}, "
                              f"{shape[2]}), got {images.dtype} {tuple(images.shape)}")
        return np.ascontiguousarray(images)

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, images: np.ndarray, boxes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        pass


def _label(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "the graph"


class OrtRunner(Runner):
    """An ONNX graph (bytes or path) in ONNX Runtime, all graph optimisations on, as deployed.
    ``providers``: names or (name, options) pairs, best first (default: the CPU provider)."""

    def __init__(self, graph: bytes | str | os.PathLike, *, threads: int | None = None,
                 providers: Sequence[Any] | None = None, batch_size: int | None = None,
                 quiet: bool = True, label: str | None = None):
        super().__init__(label or _label(graph), batch_size)
        self.graph = str(graph) if isinstance(graph, os.PathLike) else graph
        self.threads = threads
        self.requested_providers = list(providers or ["CPUExecutionProvider"])
        self.quiet = quiet
        self.session = None
        self.providers: list[str] = []

    def _activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        if self.quiet:
            options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.graph, sess_options=options,
                                                providers=self.requested_providers)
        except Exception as exc:  # onnxruntime raises its own exception zoo
            raise RunnerError(f"ONNX Runtime cannot load {self.label}: {exc}") from None
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime:{self.providers[0]}"
        self.input_shape = self._check_io()
        self.takes_valid_box = len(self.session.get_inputs()) == 2

    def _check_io(self) -> tuple[int, int, int]:
        inputs = self.session.get_inputs()
        outputs = {o.name: o for o in self.session.get_outputs()}
        problems = []
        names = [i.name for i in inputs]
        if names not in ([INPUT_NAME], [INPUT_NAME, VALID_BOX_NAME]):
            problems.append(f"inputs {names} (expected {INPUT_NAME!r}, and {VALID_BOX_NAME!r} "
                            "for letterbox bundles)")
        elif inputs[0].type != "tensor(uint8)":
            problems.append(f"input {INPUT_NAME!r} is {inputs[0].type} (expected tensor(uint8))")
        for name in (MAP_NAME, SCORE_NAME):
            if name not in outputs:
                problems.append(f"no output {name!r} (outputs: {sorted(outputs)})")
            elif outputs[name].type != "tensor(float)":
                problems.append(f"output {name!r} is {outputs[name].type} (expected tensor(float))")
        shape = inputs[0].shape if inputs else []
        if not problems and (len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:])):
            problems.append(f"input shape {shape} (expected N x 3 x H x W with fixed C, H, W)")
        if problems:
            raise RunnerError(f"{self.label} does not follow the edgestad graph contract: "
                              + "; ".join(problems))
        return (int(shape[1]), int(shape[2]), int(shape[3]))

    def _infer(self, images, boxes):
        feed = {INPUT_NAME: images}
        if boxes is not None:
            feed[VALID_BOX_NAME] = boxes
        return self.session.run([MAP_NAME, SCORE_NAME], feed)

    def _close(self) -> None:
        self.session = None


def run_graph(graph: bytes | str | os.PathLike, images: np.ndarray, boxes: np.ndarray | None = None,
              *, batch_size: int = 4, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(maps, scores) of one graph on ``images`` with ONNX Runtime's CPU provider, in one call."""
    with OrtRunner(graph, threads=threads, batch_size=batch_size) as runner:
        return runner.infer(images, boxes)


# ------------------------------------------------------------------------------ TensorRT


def import_tensorrt():
    """(pycuda.driver, tensorrt); RunnerError saying what to install when either is missing."""
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise RunnerError(f"the TensorRT backend needs the tensorrt and pycuda packages ({exc}); "
                          "install JetPack's python3-libnvinfer / pip tensorrt and pycuda") from None
    return cuda, trt


def gpu_info(device: int = 0) -> dict[str, str]:
    """{gpu_name, compute_capability "8.7", tensorrt_version} of this machine (tensorrt + pycuda)."""
    cuda, trt = import_tensorrt()
    cuda.init()
    dev = cuda.Device(device)
    return {"gpu_name": dev.name(),
            "compute_capability": ".".join(str(x) for x in dev.compute_capability()),
            "tensorrt_version": trt.__version__}


class TrtRunner(Runner):
    """A serialized TensorRT engine (bytes or path) run with pycuda: page-locked host buffers
    sized for the profile's largest batch, one CUDA stream, and the tensor-name API
    (``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) that TensorRT 10 and 11
    share. The device's primary context (the one TensorRT uses) is pushed around each call, so
    any thread may run inference."""

    name = "tensorrt"

    def __init__(self, engine: bytes | str | os.PathLike, *, device: int = 0,
                 batch_size: int | None = None, label: str | None = None):
        super().__init__(label or (Path(engine).name if isinstance(engine, (str, os.PathLike))
                                   else "the engine"), batch_size)
        self.engine_source = engine
        self.device_index = device
        self._ctx = None
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, Any] = {}

    def _activate(self) -> None:
        self._cuda, self._trt = cuda, trt = import_tensorrt()
        plan = (Path(self.engine_source).read_bytes()
                if isinstance(self.engine_source, (str, os.PathLike)) else bytes(self.engine_source))
        cuda.init()
        self._ctx = cuda.Device(self.device_index).retain_primary_context()
        self._ctx.push()
        try:
            self._setup(plan)
        except BaseException:
            self._release()
            raise
        finally:
            if self._ctx is not None:
                self._ctx.pop()
        self._batch = self.max_batch

    def _setup(self, plan: bytes) -> None:
        cuda, trt = self._cuda, self._trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RunnerError(f"TensorRT {trt.__version__} could not deserialize {self.label} "
                              "(built by another TensorRT version or for another GPU, or the file "
                              "is damaged)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = {INPUT_NAME, MAP_NAME, SCORE_NAME} - set(names)
        unknown = set(names) - {INPUT_NAME, VALID_BOX_NAME, MAP_NAME, SCORE_NAME}
        if missing or unknown:
            raise RunnerError(f"{self.label}: engine tensors {names} do not follow the edgestad "
                              f"graph contract (missing {sorted(missing)}, unknown {sorted(unknown)})")
        in_shape = tuple(self.engine.get_tensor_shape(INPUT_NAME))
        if len(in_shape) != 4 or any(d < 0 for d in in_shape[1:]):
            raise RunnerError(f"{self.label}: input shape {in_shape} is not N x 3 x H x W")
        self.input_shape = tuple(int(d) for d in in_shape[1:])
        self._dynamic = in_shape[0] < 0
        if self._dynamic:  # the profile's max is the largest batch served
            self.max_batch = int(self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])
        else:
            self.max_batch = int(in_shape[0])
        self.takes_valid_box = VALID_BOX_NAME in names
        self.stream = cuda.Stream()
        if self._dynamic:
            self._set_batch(self.max_batch)
        for name in names:
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            size = int(np.prod(tuple(self.context.get_tensor_shape(name))))
            self.host[name] = cuda.pagelocked_empty(size, dtype)
            self.device[name] = cuda.mem_alloc(self.host[name].nbytes)
            self.context.set_tensor_address(name, int(self.device[name]))
        if self.host[INPUT_NAME].dtype != np.uint8:
            raise RunnerError(f"{self.label}: input tensor is {self.host[INPUT_NAME].dtype}, "
                              "expected uint8")

    def _set_batch(self, n: int) -> None:
        shapes = {INPUT_NAME: (n, *self.input_shape), VALID_BOX_NAME: (n, 4)}
        for name in (INPUT_NAME, VALID_BOX_NAME)[: 2 if self.takes_valid_box else 1]:
            if not self.context.set_input_shape(name, shapes[name]):
                raise RunnerError(f"{self.label}: TensorRT refused shape {shapes[name]} for input "
                                  f"{name!r} (outside the engine's optimisation profile)")

    def _infer(self, images, boxes):
        cuda = self._cuda
        n = len(images)
        if n > self.max_batch:
            raise RunnerError(f"batch {n} exceeds the engine's maximum batch {self.max_batch}")
        if not self._dynamic and n != self.max_batch:
            raise RunnerError(f"engine has fixed batch {self.max_batch}, got {n}")
        h, w = self.input_shape[1:]
        self._ctx.push()
        try:
            if n != self._batch:
                self._set_batch(n)
                self._batch = n
            # Only the first n items travel: the buffers are sized for the profile's max batch.
            for name, array in ((INPUT_NAME, images), (VALID_BOX_NAME, boxes)):
                if array is not None:
                    flat = self.host[name][: array.size]
                    np.copyto(flat, array.reshape(-1))
                    cuda.memcpy_htod_async(self.device[name], flat, self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise RunnerError("TensorRT execute_async_v3 failed (see TensorRT log above)")
            cuda.memcpy_dtoh_async(self.host[MAP_NAME][: n * h * w], self.device[MAP_NAME], self.stream)
            cuda.memcpy_dtoh_async(self.host[SCORE_NAME][:n], self.device[SCORE_NAME], self.stream)
            self.stream.synchronize()
        finally:
            self._ctx.pop()
        # Copies: the pinned buffers are overwritten by the next call while callers hold these.
        return (self.host[MAP_NAME][: n * h * w].reshape(n, h, w).astype(np.float32, copy=True),
                self.host[SCORE_NAME][:n].astype(np.float32, copy=True))

    def _release(self) -> None:
        for mem in self.device.values():
            mem.free()
        self.device.clear()
        self.context = self.engine = None
        if self._ctx is not None:
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None

    def _close(self) -> None:
        if self._ctx is not None:
            self._ctx.push()
            self._release()
