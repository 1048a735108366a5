"""The TensorRT backend's control flow, against a stand-in for tensorrt + pycuda.

TensorRT cannot be installed on the development/CI machines, so this is the one place with a
substitute: a minimal model of the TensorRT 10 tensor-name API and of pycuda's driver calls that
the backend uses, with "device memory" in numpy and an "engine" computing the toy graph. It checks
what can go wrong in our code (buffer sizes, copies, tensor addresses, batch handling, engine
selection and refusal), not TensorRT itself; the real thing must be run on a Jetson/GPU.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest

from edgestad.bundle import add_files, load_bundle
from edgestad.runtime.backends import TensorRTBackend, list_engines, select_backend
from edgestad.runtime.errors import BackendError
from test_runtime_toy import make_toy_bundle

H, W = 24, 32
MEMORY: dict[int, np.ndarray] = {}  # fake device memory: address -> bytes


def _module(name):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return m


def fake_pycuda():
    drv = _module("pycuda.driver")

    class Alloc:
        def __init__(self, nbytes):
            self.addr = 0x1000 * (len(MEMORY) + 1)
            MEMORY[self.addr] = np.zeros(nbytes, np.uint8)

        def __int__(self):
            return self.addr

        def free(self):
            MEMORY.pop(self.addr)

    class Context:
        depth = 0

        def push(self):
            Context.depth += 1

        def pop(self):
            assert Context.depth > 0, "pop without push"
            Context.depth -= 1

        def detach(self):
            pass

    class Device:
        def __init__(self, i):
            pass

        def name(self):
            return "Orin"

        def compute_capability(self):
            return (8, 7)

        def retain_primary_context(self):
            return Context()

    class Stream:
        handle = 0xABC

        def synchronize(self):
            pass

    def htod(dst, src, stream):
        assert Context.depth > 0 and isinstance(stream, Stream)
        raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        MEMORY[int(dst)][: raw.size] = raw

    def dtoh(dst, src, stream):
        assert Context.depth > 0
        view = dst.view(np.uint8).reshape(-1)
        view[:] = MEMORY[int(src)][: view.size]

    drv.init = lambda: None
    drv.Device, drv.Stream, drv.Context = Device, Stream, Context
    drv.pagelocked_empty = lambda n, dtype: np.zeros(n, dtype)
    drv.mem_alloc = Alloc
    drv.memcpy_htod_async, drv.memcpy_dtoh_async = htod, dtoh
    pkg = _module("pycuda")
    pkg.driver = drv
    return pkg, drv


def fake_tensorrt(version="10.3.0.30"):
    trt = _module("tensorrt")
    trt.__version__ = version

    class DataType:
        UINT8, FLOAT = "uint8", "float32"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Context:
        def __init__(self):
            self.addr, self.shape = {}, None

        def set_input_shape(self, name, shape):
            assert name == "images" and len(shape) == 4
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            n = self.shape[0]
            return {"images": self.shape, "anomaly_map": (n, 1, H, W), "image_score": (n,)}[name]

        def set_tensor_address(self, name, ptr):
            assert isinstance(ptr, int)
            self.addr[name] = ptr

        def execute_async_v3(self, stream_handle):
            assert stream_handle == 0xABC and set(self.addr) == {"images", "anomaly_map", "image_score"}
            n = self.shape[0]
            x = MEMORY[self.addr["images"]][: n * 3 * H * W].reshape(n, 3, H, W).astype(np.float32)
            amap = (x / np.float32(255)).mean(axis=1, keepdims=True, dtype=np.float32)
            MEMORY[self.addr["anomaly_map"]][: amap.nbytes] = amap.view(np.uint8).reshape(-1)
            score = amap.reshape(n, -1).max(axis=1).astype(np.float32)
            MEMORY[self.addr["image_score"]][: score.nbytes] = score.view(np.uint8)
            return True

    class Engine:
        num_io_tensors = 3
        names = ["images", "anomaly_map", "image_score"]

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_shape(self, name):
            return {"images": (-1, 3, H, W), "anomaly_map": (-1, 1, H, W), "image_score": (-1,)}[name]

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 3, H, W), (1, 3, H, W), (4, 3, H, W)]

        def get_tensor_dtype(self, name):
            return DataType.UINT8 if name == "images" else DataType.FLOAT

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine() if blob == b"toy-engine" else None  # None: what TensorRT returns on mismatch

    trt.DataType, trt.Logger, trt.Runtime = DataType, Logger, Runtime
    trt.nptype = np.dtype
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    pkg, drv = fake_pycuda()
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    MEMORY.clear()
    yield
    MEMORY.clear()


@pytest.fixture
def engine_bundle(tmp_path):
    b = make_toy_bundle(tmp_path / "b", H, W)
    good = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0.30", "precision": "fp16"}
    old = {**good, "tensorrt_version": "8.6.2", "precision": "fp32"}
    add_files(b, {"orin.fp16.engine": b"toy-engine", "orin.fp16.json": json.dumps(good).encode(),
                  "orin.fp32.engine": b"toy-engine", "orin.fp32.json": json.dumps(old).encode()},
              manifest_updates={"exports": {"engines": ["orin.fp16.engine", "orin.fp32.engine"]}})
    return load_bundle(b)


def test_tensorrt_backend_runs_batches_and_copies_results(fake_gpu, engine_bundle):
    backend = select_backend(engine_bundle.path, engine_bundle.manifest, "auto")
    assert backend.name == "tensorrt" and backend.precision == "fp16" and backend.max_batch == 4
    assert backend.model_sha256 == engine_bundle.manifest["files"]["orin.fp16.engine"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 3, H, W), dtype=np.uint8)
    maps, scores = backend.infer(x)
    expected = (x.astype(np.float32) / 255).mean(axis=1)
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
    np.testing.assert_allclose(scores, expected.reshape(3, -1).max(axis=1), rtol=1e-6)
    maps2, _ = backend.infer(x[:1])  # batch size changes: shape re-set, earlier results untouched
    np.testing.assert_allclose(maps2[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(maps[1], expected[1], rtol=1e-6)
    with pytest.raises(BackendError, match="exceeds the engine's maximum batch 4"):
        backend.infer(np.zeros((5, 3, H, W), np.uint8))
    with pytest.raises(BackendError, match="must be uint8"):
        backend.infer(np.zeros((1, 3, H, W), np.float32))
    backend.close()
    assert MEMORY == {}  # device buffers freed


def test_engine_for_other_tensorrt_is_refused_and_auto_falls_back(fake_gpu, engine_bundle, caplog):
    with pytest.raises(BackendError, match=r"built with TensorRT 8\.6\.2, this machine has TensorRT 10\.3\.0\.30"):
        select_backend(engine_bundle.path, engine_bundle.manifest, "tensorrt", "fp32")
    with caplog.at_level("INFO"):
        b = select_backend(engine_bundle.path, engine_bundle.manifest, "auto", "fp32")
    assert b.name.startswith("onnxruntime") and "TensorRT 8.6.2" in caplog.text


def test_damaged_engine_is_a_clear_error(fake_gpu, tmp_path):
    entry = list_engines(tmp_path, {})
    assert entry == []
    (tmp_path / "x.engine").write_bytes(b"garbage")
    (tmp_path / "x.json").write_text(json.dumps({"compute_capability": "8.7", "tensorrt_version": "10.3.0"}))
    with pytest.raises(BackendError, match="could not deserialize x.engine"):
        TensorRTBackend(list_engines(tmp_path, {})[0])
