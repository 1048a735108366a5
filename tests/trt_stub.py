"""A stand-in for ``tensorrt`` + ``pycuda.driver``, for tests on machines without a GPU.

It models the calls edgestad makes, written against TensorRT 10's documented Python API (which
TensorRT 11 keeps): ``Builder`` / ``INetworkDefinition`` / ``OnnxParser`` / optimisation profile /
builder config / timing cache / ``build_serialized_network``, then ``Runtime`` /
``ICudaEngine`` / ``IExecutionContext`` with the tensor-name API, and pycuda's device, primary
context, stream, page-locked and device memory (numpy arrays here).

The "engine" it builds carries the ONNX graph and computes it with ONNX Runtime, so a verified
engine gives real outputs. What it checks is our side of the API, where a GPU run would fail:

- every network input has min/opt/max shapes in the profile, of the input's rank and fixed
  dimensions, min <= opt <= max, and one batch range for all inputs (a letterbox graph's
  ``valid_box`` included); no precision flags on a strongly typed network;
- every input shape is set (and inside the profile) before output shapes are asked for or the
  engine runs; every I/O tensor has an address; each copy and each tensor fits its allocation;
- the CUDA context is pushed around every device call; device memory is freed (``MEMORY``).

Not modelled: TensorRT's parser coverage, kernels, precision, timing, real CUDA. The profile of
every build is recorded in ``BUILDS`` and TensorRT's log in ``LOG``.
"""
from __future__ import annotations

import enum
import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest

GPU_NAME, COMPUTE_CAPABILITY, VERSION = "Orin", (8, 7), "10.3.0.30"
MAGIC = b"trt-stub-plan\n"
MEMORY: dict[int, np.ndarray] = {}   # "device memory": address -> bytes
BUILDS: list[dict] = []              # per build: {"profile": {name: (min, opt, max)}, "flags": [...]}
LOG: list[str] = []                  # what TensorRT would have logged as errors


def _module(name):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return m


# ------------------------------------------------------------------------------ pycuda


class _Context:
    depth = 0

    def push(self):
        _Context.depth += 1

    def pop(self):
        assert _Context.depth > 0, "pop without push"
        _Context.depth -= 1

    def detach(self):
        pass


def _in_context():
    assert _Context.depth > 0, "CUDA call without a current context"


class _Alloc:
    def __init__(self, nbytes):
        _in_context()
        self.addr = 0x1000 * (max(MEMORY, default=0) // 0x1000 + 1)
        MEMORY[self.addr] = np.zeros(int(nbytes), np.uint8)

    def __int__(self):
        return self.addr

    def free(self):
        _in_context()
        MEMORY.pop(self.addr)


class _Stream:
    handle = 0xABC

    def synchronize(self):
        _in_context()


def _htod(dst, src, stream):
    _in_context()
    assert isinstance(stream, _Stream)
    raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
    assert raw.size <= MEMORY[int(dst)].size, "host-to-device copy larger than the allocation"
    MEMORY[int(dst)][: raw.size] = raw


def _dtoh(dst, src, stream):
    _in_context()
    assert isinstance(stream, _Stream)
    view = dst.view(np.uint8).reshape(-1)
    assert view.size <= MEMORY[int(src)].size, "device-to-host copy larger than the allocation"
    view[:] = MEMORY[int(src)][: view.size]


def fake_pycuda():
    """(the ``pycuda`` package, ``pycuda.driver``)."""
    drv = _module("pycuda.driver")

    class Device:
        def __init__(self, index):
            assert index == 0, "one GPU in the stub"

        @staticmethod
        def count():
            return 1

        def name(self):
            return GPU_NAME

        def compute_capability(self):
            return COMPUTE_CAPABILITY

        def retain_primary_context(self):
            return _Context()

    drv.init = lambda: None
    drv.Device, drv.Stream, drv.Context = Device, _Stream, _Context
    drv.pagelocked_empty = lambda n, dtype: np.zeros(n, dtype)
    drv.mem_alloc = _Alloc
    drv.memcpy_htod_async, drv.memcpy_dtoh_async = _htod, _dtoh
    pkg = _module("pycuda")
    pkg.driver = drv
    return pkg, drv


# ------------------------------------------------------------------------------ tensorrt


class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16
    INT8 = np.int8
    INT32 = np.int32
    INT64 = np.int64
    BOOL = np.bool_
    UINT8 = np.uint8


_ONNX_TYPES = {1: DataType.FLOAT, 2: DataType.UINT8, 3: DataType.INT8, 6: DataType.INT32,
               7: DataType.INT64, 9: DataType.BOOL, 10: DataType.HALF}


class _Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class _Network:
    def __init__(self, flags):
        self.flags = flags
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.onnx = None

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class _Profile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 (TensorRT's parameter names)
        shapes = tuple(tuple(int(d) for d in s) for s in (min, opt, max))
        assert len({len(s) for s in shapes}) == 1, f"{name}: min/opt/max of different ranks"
        assert all(a <= b <= c for a, b, c in zip(*shapes)), f"{name}: not min <= opt <= max"
        self.shapes[name] = shapes

    def get_shape(self, name):
        return list(self.shapes[name])


class _TimingCache:
    def __init__(self, data):
        self.data = bytes(data) or b"timing-cache"

    def serialize(self):
        return self.data


def fake_tensorrt(version: str = VERSION):
    """The ``tensorrt`` module; a version below 9 has no strongly typed networks (TensorRT 8.6)."""
    trt = _module("tensorrt")
    trt.__version__ = version
    strongly_typed_api = int(version.split(".")[0]) >= 9

    class Logger:
        ERROR, WARNING, INFO = 1, 2, 3

        def __init__(self, level=WARNING):
            pass

    flags = {"EXPLICIT_BATCH": 0, **({"STRONGLY_TYPED": 1} if strongly_typed_api else {})}
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", flags)
    MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "TF32": 7})
    TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse(self, model: bytes, path=None):
            import onnx
            try:
                graph = onnx.load_from_string(bytes(model)).graph
            except Exception as exc:
                self.errors.append(f"cannot read the ONNX model: {exc}")
                return False
            init = {i.name for i in graph.initializer}

            def tensor(v):
                dims = [d.dim_value if d.HasField("dim_value") else -1
                        for d in v.type.tensor_type.shape.dim]
                return _Tensor(v.name, dims, _ONNX_TYPES[v.type.tensor_type.elem_type])
            self.network.inputs = [tensor(v) for v in graph.input if v.name not in init]
            self.network.outputs = [tensor(v) for v in graph.output]
            self.network.onnx = bytes(model)
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class BuilderConfig:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.pool = set(), [], None, {}

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.add(BuilderFlag(flag))

        def clear_flag(self, flag):
            self.flags.discard(BuilderFlag(flag))

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return _TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return _Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return _Profile()

        def build_serialized_network(self, network, config):
            problems = _build_problems(network, config, strongly_typed_api, NetworkDefinitionCreationFlag, BuilderFlag)
            BUILDS.append({"profile": dict(config.profiles[0].shapes) if config.profiles else {},
                           "flags": sorted(f.name for f in config.flags),
                           "inputs": [t.name for t in network.inputs], "problems": problems})
            if problems:
                LOG.extend(problems)
                return None
            header = {"version": version, "profile": config.profiles[0].shapes,
                      "tensors": [(t.name, list(t.shape), t.dtype.name, io) for io, ts in
                                  (("INPUT", network.inputs), ("OUTPUT", network.outputs)) for t in ts]}
            return MAGIC + json.dumps(header).encode() + b"\n" + network.onnx

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            plan = bytes(plan)
            if not plan.startswith(MAGIC):
                LOG.append("deserialize: not a serialized engine")
                return None    # what TensorRT returns for a damaged plan or another version's
            header, _, onnx_bytes = plan[len(MAGIC):].partition(b"\n")
            header = json.loads(header)
            if header["version"] != version:
                LOG.append(f"deserialize: plan of TensorRT {header['version']}, this is {version}")
                return None
            return Engine(header, onnx_bytes)

    class Engine:
        def __init__(self, header, onnx_bytes):
            self.tensors = {n: (tuple(s), DataType[d], TensorIOMode[io]) for n, s, d, io in header["tensors"]}
            self.names = list(self.tensors)
            self.profile = {n: [tuple(s) for s in v] for n, v in header["profile"].items()}
            self.onnx = onnx_bytes
            self.num_optimization_profiles = 1

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_shape(self, name):
            return self.tensors[name][0]

        def get_tensor_dtype(self, name):
            return self.tensors[name][1]

        def get_tensor_mode(self, name):
            return self.tensors[name][2]

        def get_tensor_profile_shape(self, name, profile_index):
            assert profile_index == 0 and self.get_tensor_mode(name) == TensorIOMode.INPUT
            return self.profile[name]

        def create_execution_context(self):
            return ExecutionContext(self)

    class ExecutionContext:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr, self.session = engine, {}, {}, None

        def _inputs(self):
            return [n for n in self.engine.names if self.engine.get_tensor_mode(n) == TensorIOMode.INPUT]

        def set_input_shape(self, name, shape):
            assert self.engine.get_tensor_mode(name) == TensorIOMode.INPUT, f"{name} is no input"
            shape, lo, hi = tuple(int(d) for d in shape), self.engine.profile[name][0], self.engine.profile[name][2]
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                LOG.append(f"set_input_shape({name}, {shape}) outside the profile {lo}..{hi}")
                return False
            self.shapes[name] = shape
            return True

        def _batch(self):
            batches = {self.shapes[n][0] for n in self._inputs() if n in self.shapes}
            if len(batches) > 1:
                LOG.append(f"inputs set to different batches {sorted(batches)}")
            return batches.pop() if len(batches) == 1 and len(self.shapes) == len(self._inputs()) else -1

        def get_tensor_shape(self, name):
            if name in self.shapes:
                return self.shapes[name]
            shape = self.engine.get_tensor_shape(name)   # -1 until every input shape is set
            return tuple(self._batch() if d == -1 else d for d in shape)

        def set_tensor_address(self, name, ptr):
            assert isinstance(ptr, int) and name in self.engine.tensors
            self.addr[name] = ptr

        def execute_async_v3(self, stream_handle):
            _in_context()
            assert stream_handle == _Stream.handle
            assert set(self.addr) == set(self.engine.names), f"addresses set for {sorted(self.addr)} only"
            assert set(self.shapes) == set(self._inputs()), f"input shapes set for {sorted(self.shapes)} only"
            n = self._batch()
            assert n > 0, "inputs of different batch sizes"
            feed = {}
            for name in self._inputs():
                dtype = self.engine.get_tensor_dtype(name).value
                size = int(np.prod(self.shapes[name])) * np.dtype(dtype).itemsize
                memory = MEMORY[self.addr[name]]
                assert size <= memory.size, f"{name}: allocation too small for {self.shapes[name]}"
                feed[name] = memory[:size].view(dtype).reshape(self.shapes[name])
            if self.session is None:
                import onnxruntime as ort
                self.session = ort.InferenceSession(self.engine.onnx, providers=["CPUExecutionProvider"])
            outputs = [n for n in self.engine.names if n not in feed]
            for name, value in zip(outputs, self.session.run(outputs, feed)):
                value = np.ascontiguousarray(value, self.engine.get_tensor_dtype(name).value)
                assert value.shape == self.get_tensor_shape(name), (name, value.shape)
                memory = MEMORY[self.addr[name]]
                assert value.nbytes <= memory.size, f"{name}: allocation too small for {value.shape}"
                memory[: value.nbytes] = value.view(np.uint8).reshape(-1)
            return True

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    trt.NetworkDefinitionCreationFlag, trt.MemoryPoolType = NetworkDefinitionCreationFlag, MemoryPoolType
    trt.BuilderFlag, trt.TensorIOMode, trt.DataType = BuilderFlag, TensorIOMode, DataType
    trt.nptype = lambda dtype: dtype.value
    return trt


def _build_problems(network, config, strongly_typed_api, creation_flag, builder_flag) -> list[str]:
    """Why TensorRT (or the graph contract's one batch range) would refuse this build."""
    problems = []
    if network.onnx is None:
        return ["the network is empty (nothing parsed)"]
    if len(config.profiles) != 1:
        return [f"expected one optimisation profile, got {len(config.profiles)}"]
    profile = config.profiles[0].shapes
    for tensor in network.inputs:
        if tensor.name not in profile:
            problems.append(f"optimization profile is missing values for input {tensor.name!r}")
            continue
        for which, shape in zip(("min", "opt", "max"), profile[tensor.name]):
            if len(shape) != len(tensor.shape) or any(
                    d != -1 and s != d for s, d in zip(shape, tensor.shape)):
                problems.append(f"{tensor.name}: profile {which} {shape} does not fit {tensor.shape}")
    ranges = {tuple(s[0] for s in shapes) for shapes in profile.values()}
    if len(ranges) > 1:
        problems.append(f"inputs have different batch ranges in the profile: {sorted(ranges)}")
    strongly_typed = strongly_typed_api and network.flags & (1 << int(creation_flag.STRONGLY_TYPED))
    if strongly_typed and config.flags & {builder_flag.FP16, builder_flag.INT8}:
        problems.append("precision flags set on a strongly typed network")
    if config.cache is None:
        problems.append("no timing cache set")
    return problems


@pytest.fixture
def fake_gpu(monkeypatch):
    """tensorrt (10.3) and pycuda stand-ins in sys.modules; yields this module (MEMORY, BUILDS, LOG)."""
    pkg, drv = fake_pycuda()
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    for record in (MEMORY, BUILDS, LOG):
        record.clear()
    _Context.depth = 0
    yield sys.modules[__name__]
    MEMORY.clear()
