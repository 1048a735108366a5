"""The runtime's TensorRT backend against tests/trt_stub.py, a stand-in for tensorrt + pycuda.

TensorRT cannot be installed on the development/CI machines. The engine here is built by export's
builder from the toy graph and run by edgestad.runner's TrtRunner through the stub, which checks
what can go wrong in our code (buffer sizes, copies, tensor addresses, input shapes, batch
handling, engine selection and refusal), not TensorRT itself; that must be run on a Jetson/GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgestad.bundle import add_files, load_bundle
from edgestad.runtime.backends import TensorRTBackend, list_engines, select_backend
from edgestad.runtime.errors import BackendError
from test_runtime_toy import make_toy_bundle, toy_graph
from trt_stub import MEMORY, fake_gpu  # noqa: F401 (fixture)

H, W = 24, 32


@pytest.fixture
def engine_bundle(fake_gpu, tmp_path):
    from edgestad.export.tensorrt_build import build_engine
    b = make_toy_bundle(tmp_path / "b", H, W)
    plan = build_engine(toy_graph(H, W), "fp16", (3, H, W), max_batch=4, log=lambda s: None).plan
    good = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0.30", "precision": "fp16"}
    old = {**good, "tensorrt_version": "8.6.2", "precision": "fp32"}
    add_files(b, {"orin.fp16.engine": plan, "orin.fp16.json": json.dumps(good).encode(),
                  "orin.fp32.engine": plan, "orin.fp32.json": json.dumps(old).encode()},
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
