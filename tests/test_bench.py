"""`edgestad bench`: FLOP counting, the JSON report, and the EfficientAD-S peer."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgestad.bench.cli import bench_command
from edgestad.bench.flops import count_gflops, onnx_conv_gflops
from edgestad.bench.graphs import export_onnx
from edgestad.bench.report import SCHEMA
from edgestad.bench.subjects import random_uninformed_students
from edgestad.bench.timing import time_calls
from edgestad.bench.efficientad import EfficientADS
from edgestad.methods.uninformed_students.fused import fuse_model

TINY = ["-p", "17", "-p", "33", "--width", "4", "--descriptor-dim", "4", "--students", "2", "--dense-stride", "2",
        "--input-size", "40x36"]


class OneConv(torch.nn.Module):
    def __init__(self, cin=3, cout=16, k=5):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k)

    def forward(self, images):
        y = self.conv(images.float())
        return y, y.amax(dim=(1, 2, 3))


def test_flop_counter_on_one_conv_is_2_k2_cin_cout_h_w(tmp_path):
    h, w, k, cin, cout = 30, 20, 5, 3, 16
    expected = 2 * k * k * cin * cout * (h - k + 1) * (w - k + 1) / 1e9
    model = OneConv(cin, cout, k)
    assert count_gflops(model, (h, w)) == pytest.approx(expected, rel=1e-12)
    graph, _ = export_onnx(model, tmp_path / "conv.onnx", (h, w))
    assert onnx_conv_gflops(graph) == pytest.approx(expected, rel=1e-12)


def test_fusion_does_not_change_the_flop_count():
    model = random_uninformed_students({"patch_sizes": [17, 65], "width": 4, "descriptor_dim": 4,
                                        "dense_stride": 2, "input_size": [40, 36]})
    assert count_gflops(fuse_model(model), (40, 36)) == pytest.approx(
        count_gflops(model, (40, 36)), rel=1e-12)


def test_time_calls_respects_iterations_and_budget():
    calls = []
    latencies = time_calls(lambda: calls.append(1), warmup=2, iterations=5, max_seconds=10)
    assert len(latencies) == 5 and len(calls) == 7
    slow = time_calls(lambda: __import__("time").sleep(0.02), warmup=0, iterations=100,
                      max_seconds=0.05)
    assert 1 <= len(slow) < 100


def test_bench_json_report(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_command, [
        *TINY, "--fused", "both", "--batch", "1", "--batch", "2",
        "--backends", "torch,ort-fp32,torch-cuda,tensorrt", "--warmup", "0", "--iterations", "2",
        "--threads", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA
    assert {"cpu", "logical_cpus", "threads", "torch", "onnxruntime", "gpu", "date"} <= set(
        report["machine"])
    assert report["settings"]["batches"] == [1, 2]
    assert [m["name"] for m in report["models"]] == ["ours", "ours-fused"]
    gpu = torch.cuda.is_available()
    for model in report["models"]:
        assert model["gflop_per_frame"] > 0
        assert model["gflop_per_frame_onnx_conv"] == pytest.approx(model["gflop_per_frame"],
                                                                   rel=1e-3)
        rows = {(r["backend"], r["batch"]): r for r in model["results"]}
        assert set(rows) == {(b, n) for b in ("torch", "ort-fp32", "torch-cuda", "tensorrt")
                             for n in (1, 2)}
        for n in (1, 2):
            for backend in ("torch", "ort-fp32"):
                row = rows[(backend, n)]
                assert row["status"] == "ok", row
                assert row["iterations"] == 2
                assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
                assert row["throughput_fps"] > 0
            # ONNX Runtime computes the same scores as torch (fp32 graph).
            assert rows[("ort-fp32", n)]["image_score_max_abs_diff_vs_torch"] < 1e-3
            if not gpu:
                assert rows[("torch-cuda", n)]["status"] == "not available"
                assert "CUDA" in rows[("torch-cuda", n)]["note"]
    assert "fused/unfused" in report["comparisons"]
    assert "| ours-fused |" in result.output


def test_bench_runs_a_bundle_and_overrides_its_dense_stride(tmp_path):
    from edgestad.bundle import write_bundle
    model = random_uninformed_students({"patch_sizes": [17], "width": 4, "descriptor_dim": 4,
                                        "input_size": [36, 36]})
    manifest = {"method": "uninformed_students", "method_config": model.config.to_dict(),
                "input": {"height": 36, "width": 36, "channels": 3, "dtype": "uint8"}}
    bundle = write_bundle(tmp_path / "bundle", manifest,
                          {k: v.numpy() for k, v in model.state_dict().items()})
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_command, [
        str(bundle), "--dense-stride", "2", "--backends", "torch", "--batch", "1",
        "--iterations", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    entry = json.loads(out.read_text())["models"][0]
    assert entry["method_config"]["dense_stride"] == 2
    assert entry["source"].startswith("bundle ")
    bad = CliRunner().invoke(bench_command, [str(bundle), "--width", "8"])
    assert bad.exit_code != 0 and "random-weight" in bad.output


def test_unknown_backend_is_refused():
    result = CliRunner().invoke(bench_command, [*TINY, "--backends", "torch,cuda-magic"])
    assert result.exit_code != 0 and "cuda-magic" in result.output


def test_efficientad_s_shapes_and_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = EfficientADS((256, 256)).eval()
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        teacher = model.teacher(images.float())
        student = model.student(images.float())
        anomaly_map, score = model(images)
    assert teacher.shape == (1, 384, 56, 56) and student.shape == (1, 768, 56, 56)
    assert anomaly_map.shape == (1, 1, 256, 256) and score.shape == (1,)
    assert torch.equal(score, anomaly_map.amax(dim=(1, 2, 3)))
    # Published cost of EfficientAD-S at 256²: ~ 76 GFLOP (2·MAC) for teacher+student+AE.
    assert count_gflops(model, (256, 256)) == pytest.approx(75.89, abs=0.05)
    graph, _ = export_onnx(model, tmp_path / "efficientad_s.onnx", (256, 256))
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run(None, {"images": images.numpy()})
    assert onnx_map.shape == (1, 1, 256, 256)
    np.testing.assert_allclose(onnx_score, score.numpy(), rtol=1e-4, atol=1e-6)


def test_efficientad_s_needs_256_pixels():
    with pytest.raises(ValueError, match="256"):
        EfficientADS((128, 128))


def test_every_method_and_the_peer_in_one_run(tmp_path):
    """GFLOP and timings of several methods beside EfficientAD-S, measured in the same run."""
    import json
    out = tmp_path / "all.json"
    result = CliRunner().invoke(bench_command, [
        "--method", "stfpm", "--method", "resnet_students", "--peer", "efficientad-s",
        "--input-size", "256", "--backends", "torch", "--batch", "1", "--iterations", "1",
        "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["stfpm", "resnet_students", "efficientad-s"]
    assert all(m["gflop_per_frame"] > 0 for m in report["models"])
    assert set(report["comparisons"]) >= {"stfpm/efficientad-s", "resnet_students/efficientad-s"}
