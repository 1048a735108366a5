"""TensorRT engine naming and sidecars (no TensorRT needed), the TensorRT 8.6 builder path against
tests/trt_stub.py, and a real build where TensorRT exists. The stubbed builder -> verification ->
TrtRunner -> runtime -> bench runs for squash and letterbox bundles are in test_export.py (they
use its exported bundle)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgestad.export import tensorrt_build as trtb
from trt_stub import fake_pycuda, fake_tensorrt


def test_engine_names_carry_gpu_capability_version_and_precision():
    assert trtb.engine_file_name("fp16", "Orin", "8.7", "10.3.0") == "model.fp16.Orin_sm87_trt10.3.0.engine"
    assert trtb.engine_file_name("int8", "NVIDIA GeForce RTX 4090", "8.9", "10.7.0.23") == \
        "model.int8.NVIDIA-GeForce-RTX-4090_sm89_trt10.7.0.23.engine"
    assert trtb.sanitize_gpu_name("  NVIDIA  A100-SXM4-80GB (MIG 1g.10gb) ") == "NVIDIA-A100-SXM4-80GB-MIG-1g-10gb"
    assert trtb.sidecar_file_name("model.fp32.Orin_sm87_trt10.3.0.engine") == "model.fp32.Orin_sm87_trt10.3.0.json"
    with pytest.raises(ValueError, match="unknown precision"):
        trtb.engine_file_name("int4", "Orin", "8.7", "10.3.0")
    with pytest.raises(ValueError, match="compute capability"):
        trtb.engine_file_name("fp16", "Orin", "sm_87", "10.3.0")
    with pytest.raises(ValueError):
        trtb.sidecar_file_name("model.onnx")


def test_sidecar_holds_what_the_runtime_checks(tmp_path):
    gpu = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0"}
    sidecar = trtb.make_sidecar(precision="fp16", gpu=gpu, onnx_file="model.fp16.onnx", onnx_sha256="a" * 64,
                                input_shape=(3, 256, 256), batch=1, max_batch=8, workspace_mb=1024,
                                strongly_typed=True, verification={"passed": True, "max_rel_diff_map": 1e-3})
    for key in ("gpu_name", "compute_capability", "tensorrt_version", "precision", "onnx_sha256", "built_at"):
        assert sidecar[key]
    assert sidecar["profile"] == {"min_batch": 1, "opt_batch": 1, "max_batch": 8}
    assert json.loads(trtb.sidecar_json(sidecar)) == sidecar
    cache = trtb.default_timing_cache(gpu)
    assert cache.name == "timing_Orin_sm87_trt10.3.0.cache"

    # The runtime finds the engine through the manifest entry export writes and accepts the
    # sidecar on the same GPU / TensorRT, refuses it on another.
    backends = pytest.importorskip("edgestad.runtime.backends")
    if not hasattr(backends, "list_engines") or not hasattr(backends, "engine_compat_problems"):
        pytest.skip("runtime backends do not expose list_engines/engine_compat_problems")
    name = trtb.engine_file_name("fp16", **gpu)
    (tmp_path / name).write_bytes(b"plan")
    (tmp_path / trtb.sidecar_file_name(name)).write_bytes(trtb.sidecar_json(sidecar))
    manifest = {"exports": {"engines": [{"file": name, "sidecar": trtb.sidecar_file_name(name),
                                         "precision": "fp16"}]}}
    (entry,) = backends.list_engines(tmp_path, manifest)
    assert entry.precision == "fp16" and entry.sidecar["onnx_sha256"] == "a" * 64
    assert backends.engine_compat_problems(entry.sidecar, gpu) == []
    assert backends.engine_compat_problems(entry.sidecar, {**gpu, "compute_capability": "8.6"})


def test_tensorrt_status_explains_absence():
    available, why = trtb.tensorrt_status()
    if not available:
        assert "TensorRT" in why or "pycuda" in why or "GPU" in why or "CUDA" in why


def test_engine_build_and_verification_on_a_gpu(tmp_path, tiny_dataset):
    """Builds real fp32/fp16/int8 engines for a tiny bundle and checks them against ONNX Runtime."""
    available, why = trtb.tensorrt_status()
    if not available:
        pytest.skip(f"needs TensorRT and a GPU: {why}")
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from edgestad.bundle import load_bundle
    from edgestad.cli import main
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("_test_export", Path(__file__).with_name("test_export.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    FAST, _write_tiny_bundle = helpers.FAST, helpers._write_tiny_bundle

    bundle = _write_tiny_bundle(tmp_path / "bundle", tiny_dataset)
    result = CliRunner().invoke(main, ["export", str(bundle), "-p", "all", "--engine",
                                       "--timing-cache", str(tmp_path / "timing.cache"), *FAST])
    assert result.exit_code == 0, result.output
    manifest = load_bundle(bundle).manifest
    engines = manifest["exports"]["engines"]
    assert {e["precision"] for e in engines} == {"fp32", "fp16", "int8"}
    for entry in engines:
        sidecar = json.loads((bundle / entry["sidecar"]).read_text())
        assert sidecar["verification"]["passed"], sidecar["verification"]
        assert sidecar["onnx_sha256"] == manifest["exports"]["onnx_sha256"][entry["precision"]]
    assert (tmp_path / "timing.cache").stat().st_size > 0
    from edgestad.runner import TrtRunner
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    with TrtRunner(bundle / engines[0]["file"]) as runner:
        maps, scores = runner.infer(images)
    assert maps.shape == (3, 64, 64) and scores.shape == (3,)


def test_tensorrt_8_6_builds_with_precision_flags(monkeypatch, tmp_path):
    """TensorRT 8.6 (JetPack 6.0) has no strongly typed networks: the builder sets FP16/INT8."""
    import sys

    import trt_stub
    from test_runtime_toy import toy_graph
    pkg, drv = fake_pycuda()
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("8.6.2"))
    trt_stub.BUILDS.clear()
    built = trtb.build_engine(toy_graph(16, 16), "int8", (3, 16, 16), log=lambda s: None)
    assert not built.strongly_typed
    assert trt_stub.BUILDS[-1]["flags"] == ["FP16", "INT8"] and trt_stub.BUILDS[-1]["problems"] == []
