"""Export: ONNX graphs per precision, TensorRT-compatibility check, parity, bad input.

One tiny bundle (width 4, d 8, two scales, dense stride 2, 64 x 64 input, random weights) is
exported once through the CLI exactly as the card writes it (`edgestad export --precision ...`
with the bundle taken from EDGESTAD_BUNDLE); the tests then inspect the real files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgestad.bundle import BundleError, load_bundle, write_bundle  # noqa: E402
from edgestad.cli import main  # noqa: E402
from edgestad.export import graph as G  # noqa: E402
from edgestad.export.precision import fp16_split  # noqa: E402
from edgestad.export.trt_compat import (TrtCompatError, assert_tensorrt_compatible,  # noqa: E402
                                        check_tensorrt_compatible)
from edgestad.export import tensorrt_build as trtb  # noqa: E402
from edgestad.methods import build_model, load_model  # noqa: E402
from trt_stub import fake_gpu  # noqa: E402,F401 (fixture)

SIZE = 64
FAST = ["--calibration-images", "4", "--parity-images", "2", "--threads", "2"]


def _tiny_manifest(data: Path, resize: str = "area_or_linear", **config) -> dict:
    method_config = dict(patch_sizes=[17, 33], num_students=2, descriptor_dim=8, width=4,
                         input_size=[SIZE, SIZE], dense_stride=2, resize=resize)
    method_config.update(config)
    return {
        "method": "uninformed_students",
        "method_config": method_config,
        "input": {"height": SIZE, "width": SIZE, "channels": 3, "color": "RGB", "layout": "NCHW",
                  "dtype": "uint8", "resize": resize,
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "thresholds": {"pixel": 1.5, "image": 2.5, "rule": {"pixel_fpr": 0.001}},
        "image_score": "max",
        "provenance": {"data": str(data), "split": {"seed": 0, "val_fraction": 0.1}},
    }


def _write_tiny_bundle(path: Path, data: Path, seed: int = 0, **config) -> Path:
    manifest = _tiny_manifest(data, **config)
    torch.manual_seed(seed)
    model = build_model(manifest["method"], manifest["method_config"])
    # Non-trivial statistics so every normalisation in the graph does something.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.startswith("descriptor_std") or name.startswith("score_stats"):
                buf.copy_(buf + torch.rand_like(buf) * 0.5)
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return write_bundle(path, manifest, weights)


def _listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dataset):
    """A tiny bundle exported with `edgestad export --precision all` (bundle from the env)."""
    torch.set_num_threads(2)
    bundle = _write_tiny_bundle(tmp_path_factory.mktemp("export") / "bundle", tiny_dataset)
    result = CliRunner().invoke(main, ["export", "--precision", "all", *FAST],
                                env={"EDGESTAD_BUNDLE": str(bundle)})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return bundle, result.output


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


# ---------------------------------------------------------------------------- the exported bundle


def test_export_writes_graphs_report_and_manifest(exported):
    bundle_dir, output = exported
    bundle = load_bundle(bundle_dir)  # verifies every file's sha256
    exports = bundle.manifest["exports"]
    assert exports["onnx"] == {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx", "export_report.json"):
        assert name in bundle.files
    assert exports["engines"] == []
    # No TensorRT here: the CLI says where to build the engine, and still succeeds.
    assert "TensorRT is not installed here" in output and "build them on the target device" in output
    assert not [p for p in bundle_dir.iterdir() if p.name.startswith(".")]  # no temp leftovers
    report = json.loads((bundle_dir / "export_report.json").read_text())
    assert set(report["graphs"]) == {"fp32", "fp16", "int8"}
    assert report["graphs"]["int8"]["accuracy"]["au_pro"] is not None
    assert "delta_au_pro" in report["graphs"]["int8"]["accuracy"]
    # OK/NG agreement with the fp32 graph at the bundle's thresholds
    for precision in ("fp16", "int8"):
        assert 0.0 <= report["graphs"][precision]["accuracy"]["same_decision"] <= 1.0


def test_graph_io_contract_and_metadata(exported):
    bundle_dir, _ = exported
    bundle = load_bundle(bundle_dir)
    for precision, name in G.ONNX_FILES.items():
        model = onnx.load(str(bundle_dir / name))
        (inp,) = model.graph.input
        assert inp.name == "images" and inp.type.tensor_type.elem_type == TensorProto.UINT8
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert dims == ["batch", 3, SIZE, SIZE]
        out = {o.name: o for o in model.graph.output}
        assert list(out) == ["anomaly_map", "image_score"]
        assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in out.values())
        assert [d.dim_param or d.dim_value for d in out["anomaly_map"].type.tensor_type.shape.dim] == \
            ["batch", 1, SIZE, SIZE]
        meta = G.read_metadata(model)
        assert meta["precision"] == precision and meta["opset"] == "17"
        assert meta["method"] == "uninformed_students"
        assert meta["weights_sha256"] == bundle.files["weights.safetensors"]
        assert json.loads(meta["thresholds"]) == bundle.manifest["thresholds"]
        assert json.loads(meta["input_size"]) == [SIZE, SIZE]
        assert meta["producer"] == "edgestad" and meta["producer_version"]
        assert G.default_opset(model) == 17


def test_fp32_graph_matches_torch(exported):
    bundle_dir, _ = exported
    model = load_model(bundle_dir)
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3):  # dynamic batch
        images = _images(n, seed=n)
        with torch.no_grad():
            ref_map, ref_score = (t.numpy() for t in model(torch.from_numpy(images)))
        got_map, got_score = session.run(None, {"images": images})
        rel = np.abs(got_map - ref_map).max() / np.abs(ref_map).max()
        assert rel <= 1e-4, rel
        assert np.allclose(got_score, got_map.max(axis=(1, 2, 3)))
        assert np.abs(got_score - ref_score).max() / np.abs(ref_score).max() <= 1e-4
    report = json.loads((bundle_dir / "export_report.json").read_text())
    parity = report["graphs"]["fp32"]["parity"]["vs_torch"]
    assert parity["passed"] and parity["max_rel_diff_map"] <= 1e-4


def test_fp16_graph_keeps_float32_io_and_scoring_tail(exported):
    bundle_dir, _ = exported
    fp32 = onnx.load(str(bundle_dir / "model.onnx"))
    fp16 = onnx.load(str(bundle_dir / "model.fp16.onnx"))
    split = fp16_split(fp32)
    types = G.tensor_types(fp16)
    nodes = G.nodes_by_name(fp16)
    float_types = (TensorProto.FLOAT, TensorProto.FLOAT16)
    # Every node the rule keeps in fp32 reads and writes float32 only, in the converted graph.
    tail = [nodes[name] for name in split.fp32_nodes if name in nodes]
    assert any(n.op_type == "ReduceSum" for n in tail) and any(n.op_type == "Resize" for n in tail)
    for node in tail:
        for name in list(node.input) + list(node.output):
            if name and types.get(name) in float_types:
                assert types[name] == TensorProto.FLOAT, (node.name, node.op_type, name)
    # ...and every conv of the networks runs in fp16.
    convs = [n for n in fp16.graph.node if n.op_type == "Conv"]
    assert convs and all(types[c.input[1]] == TensorProto.FLOAT16 for c in convs)
    assert all(types[c.output[0]] == TensorProto.FLOAT16 for c in convs)
    # Casts only at the region borders: one into fp16 per input normalisation, one out per net.
    casts = [n for n in fp16.graph.node if n.op_type == "Cast" and n.input[0] != "images"]
    assert len(casts) <= 1 + len([c for c in convs if types[c.output[0]] == TensorProto.FLOAT16])
    images = _images(2)
    ref = ort.InferenceSession(str(bundle_dir / "model.onnx")).run(None, {"images": images})[0]
    got = ort.InferenceSession(str(bundle_dir / "model.fp16.onnx")).run(None, {"images": images})[0]
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-2


def test_int8_graph_is_explicitly_quantized_per_channel(exported):
    bundle_dir, _ = exported
    model = onnx.load(str(bundle_dir / "model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    produced = G.producers(model)
    ops = G.op_counts(model)
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv in convs:
        act, weight = produced[conv.input[0]], produced[conv.input[1]]
        assert act.op_type == weight.op_type == "DequantizeLinear"
        w = inits[weight.input[0]]
        scale = inits[weight.input[1]]
        assert w.dtype == np.int8
        assert scale.shape == (w.shape[0],)  # per output channel
        assert {a.name: a.i for a in weight.attribute}.get("axis", 1) == 0
        assert np.all(inits[weight.input[2]] == 0) and inits[weight.input[2]].dtype == np.int8
        assert inits[produced[act.input[0]].input[2]].dtype == np.int8  # symmetric int8 activations
        assert not [c for c in G.consumers(model).get(conv.output[0], []) if c.op_type == "QuantizeLinear"]
    got = ort.InferenceSession(str(bundle_dir / "model.int8.onnx")).run(None, {"images": _images(2)})
    assert got[0].dtype == np.float32 and np.isfinite(got[0]).all()


def test_exported_graphs_pass_the_tensorrt_check(exported):
    bundle_dir, _ = exported
    for name in G.ONNX_FILES.values():
        report = assert_tensorrt_compatible(bundle_dir / name)
        assert report.ok and report.opset == 17


# ---------------------------------------------------------------------------- reuse, stale engines


def test_card_form_reuses_current_graphs_and_drops_stale_engines(exported, tmp_path):
    bundle_dir, _ = exported
    work = tmp_path / "bundle"
    import shutil
    shutil.copytree(bundle_dir, work)
    # Pretend an int8 engine was built from an older int8 graph.
    from edgestad.bundle import add_files
    stale = {"file": "model.int8.Orin_sm87_trt10.3.0.engine", "sidecar": "model.int8.Orin_sm87_trt10.3.0.json",
             "precision": "int8", "onnx_sha256": "0" * 64}
    add_files(work, {stale["file"]: b"plan", stale["sidecar"]: b"{}"},
              manifest_updates={"exports": {"engines": [stale]}})
    before = _listing(work)
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--precision", "fp16"], env={"EDGESTAD_BUNDLE": str(work)})
    assert result.exit_code == 0, result.output
    assert "reusing model.fp16.onnx" in result.output
    assert _listing(work)["model.fp16.onnx"] == before["model.fp16.onnx"]
    # the exports section is rewritten whole: graphs not asked for this time stay listed
    exports = load_bundle(work).manifest["exports"]
    assert exports["onnx"] == G.ONNX_FILES and set(exports["precision_rules"]) == set(G.ONNX_FILES)
    # A different calibration makes a new int8 graph: the engine built from the old one goes.
    result = runner.invoke(main, ["export", str(work), "-p", "int8", "--calibration-images", "3",
                                  "--parity-images", "2", "--no-accuracy"])
    assert result.exit_code == 0, result.output
    manifest = load_bundle(work).manifest
    assert manifest["exports"]["engines"] == []
    assert stale["file"] not in manifest["files"] and not (work / stale["file"]).exists()
    assert G.read_metadata(onnx.load(str(work / "model.int8.onnx")))["calibration"] == \
        json.dumps({"images": 3, "method": "minmax", "fp16_stride": 4, "fp16_feeds": True},
                   sort_keys=True)
    # --int8-fp16-stride is an int8 setting: only the int8 graph is remade.
    fp32_before = _listing(work)["model.onnx"]
    result = runner.invoke(main, ["export", str(work), "-p", "int8", "--calibration-images", "3",
                                  "--int8-fp16-stride", "0", "--parity-images", "2", "--no-accuracy"])
    assert result.exit_code == 0, result.output
    assert "reusing model.onnx" in result.output and _listing(work)["model.onnx"] == fp32_before
    assert json.loads(G.read_metadata(onnx.load(str(work / "model.int8.onnx")))["calibration"])[
        "fp16_stride"] == 0


def test_thresholds_command_keeps_exported_graphs_current(exported, tmp_path):
    """`edgestad thresholds` rewrites the thresholds baked into every real exported graph: the
    bundle verifies, export then reuses every graph (nothing re-exported), the graphs still give
    the same maps, and ONNX Runtime loads them."""
    import shutil
    bundle_dir, _ = exported
    work = tmp_path / "bundle"
    shutil.copytree(bundle_dir, work)
    before = _listing(work)
    runner = CliRunner()
    result = runner.invoke(main, ["thresholds", str(work), "--image-threshold", "3.25",
                                  "--pixel-threshold", "1.75"])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(work)
    assert (bundle.thresholds["pixel"], bundle.thresholds["image"]) == (1.75, 3.25)
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        meta = G.read_metadata(onnx.load(str(work / name)))
        assert json.loads(meta["thresholds"]) == bundle.thresholds
        assert onnx.load(str(work / name)).graph == onnx.load_from_string(before[name]).graph
    result = runner.invoke(main, ["export", str(work), "--precision", "all", *FAST])
    assert result.exit_code == 0, result.output
    assert "re-exporting" not in result.output and result.output.count("reusing ") == 3
    images = _images(2)
    for name in ("model.onnx", "model.int8.onnx"):
        old = ort.InferenceSession(before[name]).run(None, {"images": images})
        new = ort.InferenceSession(str(work / name)).run(None, {"images": images})
        assert all(np.array_equal(a, b) for a, b in zip(old, new))


def test_fused_export_is_one_grouped_network_per_scale_with_the_same_maps(exported, tmp_path):
    bundle_dir, _ = exported
    work = tmp_path / "bundle"
    import shutil
    shutil.copytree(bundle_dir, work)
    result = CliRunner().invoke(main, ["export", str(work), "-p", "fp32", "--fused",
                                       "--no-accuracy", *FAST])
    assert result.exit_code == 0, result.output
    assert "network form default != fused" in result.output   # the separate graph was replaced
    fused = onnx.load(str(work / "model.onnx"))
    assert G.read_metadata(fused)["network_form"] == "fused"
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1)
              for n in fused.graph.node if n.op_type == "Conv"]
    students = load_bundle(work).manifest["method_config"]["num_students"]
    assert set(groups) == {1, students + 1}          # stacked first convs, grouped ones after
    separate = onnx.load(str(bundle_dir / "model.onnx"))
    assert sum(n.op_type == "Conv" for n in fused.graph.node) * (students + 1) == \
        sum(n.op_type == "Conv" for n in separate.graph.node)
    images = _images(3, seed=7)
    got = ort.InferenceSession(str(work / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"images": images})
    ref = ort.InferenceSession(str(bundle_dir / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"images": images})
    assert np.abs(got[0] - ref[0]).max() / np.abs(ref[0]).max() <= 1e-4
    report = json.loads((work / "export_report.json").read_text())
    assert report["graphs"]["fp32"]["parity"]["vs_torch"]["passed"]
    # Asking for the separate form again re-exports (and says why).
    result = CliRunner().invoke(main, ["export", str(work), "-p", "fp32", "--no-accuracy", *FAST])
    assert result.exit_code == 0 and "network form fused != default" in result.output


# ---------------------------------------------------------------------------- bad input


def test_unknown_precision_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path), "--precision", "int4"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: -p / --precision: ") and "int4" in result.stderr


def test_missing_bundle_argument_explains_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGESTAD_BUNDLE", raising=False)
    result = CliRunner().invoke(main, ["export", "--precision", "fp16"])
    assert result.exit_code == 2 and "EDGESTAD_BUNDLE" in result.output


@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_damaged_bundle_is_refused_and_left_untouched(tmp_path, tiny_dataset, damage):
    bundle = _write_tiny_bundle(tmp_path / "bundle", tiny_dataset)
    weights = bundle / "weights.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    before = _listing(bundle)
    result = CliRunner().invoke(main, ["export", str(bundle), "-p", "fp16"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "weights.safetensors" in result.output
    assert ("missing" in result.output) if damage == "missing" else ("sha256 mismatch" in result.output)
    assert _listing(bundle) == before
    with pytest.raises(BundleError):
        load_bundle(bundle)


class _DilatedPoolNet(torch.nn.Module):
    """A real model with dilated max-pooling: TensorRT has no such layer."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, images):
        x = self.conv(images.float() / 255.0)
        x = torch.nn.functional.max_pool2d(x, 2, stride=1, dilation=2, padding=1)
        amap = x.mean(1, keepdim=True)[..., :images.shape[-2], :images.shape[-1]]
        return amap, amap.amax(dim=(1, 2, 3))


class _DilatedConfig(dict):
    @classmethod
    def from_dict(cls, values):
        return cls(values)


def test_tensorrt_incompatible_graph_is_refused_with_nothing_written(tmp_path, tiny_dataset, monkeypatch):
    from edgestad import methods
    from edgestad.methods.base import Method

    class _DilatedMethod(Method):
        name = "dilated_pool_demo"
        config_cls = _DilatedConfig

        def build(self, config):
            return _DilatedPoolNet(config)

    monkeypatch.setitem(methods._METHOD_MODULES, "dilated_pool_demo", __name__)
    monkeypatch.setitem(methods._REGISTRY, "dilated_pool_demo", _DilatedMethod())
    manifest = _tiny_manifest(tiny_dataset)
    manifest["method"], manifest["method_config"] = "dilated_pool_demo", {}
    net = _DilatedPoolNet({})
    bundle = write_bundle(tmp_path / "bundle", manifest,
                          {k: v.detach().numpy() for k, v in net.state_dict().items()})
    before = _listing(bundle)
    result = CliRunner().invoke(main, ["export", str(bundle), "-p", "fp32", *FAST])
    assert result.exit_code == 2, result.output
    assert "not TensorRT-compatible" in result.output
    assert "(MaxPool): dilations [2, 2]" in result.output
    assert "nothing was written" in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert _listing(bundle) == before


# ---------------------------------------------------------------------------- the TensorRT check


def _graph(nodes, inputs, outputs, opset=17, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _vi(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def test_tensorrt_check_rejects_dilated_maxpool():
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool_dilated", kernel_shape=[2, 2],
                            dilations=[2, 2])
    model = _graph([node], [_vi("x", ["batch", 4, 16, 16])], [_vi("y", ["batch", 4, 14, 14])])
    with pytest.raises(TrtCompatError, match=r"node 'pool_dilated' \(MaxPool\): dilations \[2, 2\]"):
        assert_tensorrt_compatible(model)


def test_tensorrt_check_rejects_loop():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _vi("v_in", [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _vi("v_out", [1, 4])])
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="the_loop", body=body)
    model = _graph([loop], [_vi("x", [1, 4])], [_vi("y", [1, 4])], initializers=[
        numpy_helper.from_array(np.array(3, dtype=np.int64), "trip"),
        numpy_helper.from_array(np.array(True), "cond")])
    report = check_tensorrt_compatible(model)
    assert not report.ok
    assert any("node 'the_loop' (Loop): refused: control flow" in str(p) for p in report.problems)


def test_tensorrt_check_rejects_dynamic_spatial_dims():
    node = helper.make_node("Relu", ["images"], ["out"], name="relu")
    model = _graph([node], [_vi("images", ["batch", 3, "height", 64])], [_vi("out", ["batch", 3, "height", 64])])
    report = check_tensorrt_compatible(model)
    messages = [str(p) for p in report.problems]
    assert any("graph input 'images' has a dynamic dimension 2 ('height')" in m for m in messages)
    assert any("graph output 'out'" in m for m in messages)


def test_tensorrt_check_rejects_old_opset():
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = _graph([node], [_vi("x", ["batch", 3, 8, 8])], [_vi("y", ["batch", 3, 8, 8])], opset=13)
    with pytest.raises(TrtCompatError, match="opset 13 is below the required minimum 17"):
        assert_tensorrt_compatible(model, "old.onnx")


def test_tensorrt_check_rejects_unknown_ops_and_uint8_quantization():
    nodes = [helper.make_node("Col2Im", ["x", "s", "b"], ["y"], name="c2i"),
             helper.make_node("QuantizeLinear", ["x", "scale"], ["q"], name="q_uint8")]
    model = _graph(nodes, [_vi("x", [1, 4, 4])], [_vi("y", [1, 1, 4, 4]), _vi("q", [1, 4, 4], TensorProto.UINT8)],
                   initializers=[numpy_helper.from_array(np.array([4, 4], dtype=np.int64), "s"),
                                 numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "b"),
                                 numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")])
    messages = [str(p) for p in check_tensorrt_compatible(model).problems]
    assert any("node 'c2i' (Col2Im): operator not supported" in m for m in messages)
    assert any("node 'q_uint8' (QuantizeLinear): no zero point" in m for m in messages)


def test_opset18_to_17_rewrite_is_exact():
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    sizes = numpy_helper.from_array(np.array([1, 2, 12, 12], dtype=np.int64), "sizes")
    nodes = [helper.make_node("Resize", ["x", "", "", "sizes"], ["r"], name="up", mode="linear",
                              coordinate_transformation_mode="align_corners", antialias=0,
                              keep_aspect_ratio_policy="stretch"),
             helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="mean", keepdims=0),
             helper.make_node("ReduceMax", ["r", "axes"], ["mx"], name="max", keepdims=0)]
    model = _graph(nodes, [_vi("x", [1, 2, 6, 6])], [_vi("m", [1, 2]), _vi("mx", [1, 2])], opset=18,
                   initializers=[axes, sizes])
    down = G.downgrade_to_opset17(model)
    onnx.checker.check_model(down, full_check=True)
    assert G.default_opset(down) == 17 and "axes" not in {i.name for i in down.graph.initializer}
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    a = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    b = ort.InferenceSession(down.SerializeToString()).run(None, {"x": x})
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    bad = _graph([helper.make_node("Pad", ["x", "pads", "", "pax"], ["y"], name="pad_axes")],
                 [_vi("x", [1, 2, 6, 6])], [_vi("y", [1, 2, 6, 8])], opset=18, initializers=[
                     numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "pads"),
                     numpy_helper.from_array(np.array([3], dtype=np.int64), "pax")])
    with pytest.raises(G.GraphError, match="pad_axes"):
        G.downgrade_to_opset17(bad)


def test_replacing_the_fp32_graph_removes_graphs_derived_from_the_old_one(exported, tmp_path):
    import shutil
    bundle_dir, _ = exported
    work = tmp_path / "bundle"
    shutil.copytree(bundle_dir, work)
    result = CliRunner().invoke(main, ["export", str(work), "-p", "fp32", "--force", "--no-accuracy",
                                       "--parity-images", "2"])
    assert result.exit_code == 0, result.output
    assert "removing model.int8.onnx: it was derived from the previous fp32 graph" in result.output
    bundle = load_bundle(work)
    assert bundle.manifest["exports"]["onnx"] == {"fp32": "model.onnx"}
    assert set(bundle.manifest["exports"]["onnx_sha256"]) == {"fp32"}
    assert not (work / "model.fp16.onnx").exists() and not (work / "model.int8.onnx").exists()
    assert set(json.loads((work / "export_report.json").read_text())["graphs"]) == {"fp32"}


def _offset_graph(offset: float, size: int = 8) -> bytes:
    """A real ONNX graph: map = channel mean of the image / 255, score = image mean / 255 + offset."""
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "scale"], ["xs"]),
        helper.make_node("ReduceMean", ["xs"], ["anomaly_map"], axes=[1], keepdims=1),
        helper.make_node("ReduceMean", ["xs"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Add", ["mean", "offset"], ["image_score"]),
    ]
    graph = helper.make_graph(
        nodes, "offset",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, size, size]),
         helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
         numpy_helper.from_array(np.array(offset, np.float32), "offset")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def test_accuracy_cost_warns_when_a_precision_decides_differently():
    """A reduced-precision graph whose scores sit higher than fp32's (as int8 does on screw) is
    measured as deciding differently at the bundle's thresholds, and the export log says so."""
    from edgestad.export.parity import SAME_DECISION_TARGET, accuracy_cost
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 3, 8, 8), dtype=np.uint8)
    labels = np.array([0] * 10 + [1] * 10)
    masks = np.zeros((20, 8, 8), np.uint8)
    masks[10:, 2:4, 2:4] = 1
    scores = images.astype(np.float32).mean(axis=(1, 2, 3)) / 255
    threshold = float(np.median(scores))
    logged = []
    report = accuracy_cost({"fp32": _offset_graph(0.0), "fp16": _offset_graph(0.0),
                            "int8": _offset_graph(1.0)}, images, masks, labels,
                           log=logged.append, thresholds={"image": threshold})
    assert report["graphs"]["fp16"]["same_decision"] == 1.0
    int8 = report["graphs"]["int8"]["same_decision"]
    assert int8 == pytest.approx(float((scores <= threshold).mean()))   # all of those flip to NG
    assert int8 < SAME_DECISION_TARGET
    warnings = [line for line in logged if "WARNING" in line]
    assert len(warnings) == 1 and "int8 graph decides differently" in warnings[0]


# ---------------------------------------------------------------------------- TensorRT, stubbed
# Builder -> engine verification -> TrtRunner -> runtime -> bench, for a squash and a letterbox
# bundle, against tests/trt_stub.py (tensorrt + pycuda stand-ins): what runs on a GPU, minus
# TensorRT itself.


@pytest.fixture(scope="module")
def letterbox_exported(tmp_path_factory, tiny_dataset):
    """A tiny letterbox bundle (fp32, fp16 graphs) trained on images of different aspect ratios,
    so their valid boxes differ."""
    from edgestad.export.exporter import ExportOptions, export_bundle
    from methods.test_conformance import _crop_dataset
    root = tmp_path_factory.mktemp("letterbox")
    bundle = _write_tiny_bundle(root / "bundle", _crop_dataset(tiny_dataset, root / "data"),
                                resize="letterbox", patch_sizes=[17])
    export_bundle(bundle, ExportOptions(precisions=("fp32", "fp16"), parity_images=3, accuracy=False,
                                        engine=False, threads=2), log=lambda s: None)
    return bundle


@pytest.fixture(scope="module", params=["area_or_linear", "letterbox"])
def small_bundle(request):
    """An exported bundle of each resize rule (module scope: made before the stub is installed)."""
    if request.param == "letterbox":
        return request.getfixturevalue("letterbox_exported")
    return request.getfixturevalue("exported")[0]


def _copy(bundle, tmp_path):
    import shutil
    return shutil.copytree(bundle, tmp_path / "bundle")


def test_engines_built_verified_and_run_through_the_stub(fake_gpu, small_bundle, tmp_path):
    from edgestad.bundle import load_bundle
    from edgestad.contract import uses_valid_box
    from edgestad.export.calibration import calibration_images
    from edgestad.export.exporter import ExportOptions, export_bundle
    from edgestad.runner import OrtRunner
    from edgestad.runtime.backends import select_backend

    bundle_dir = _copy(small_bundle, tmp_path)
    letterbox = uses_valid_box(load_bundle(bundle_dir).manifest["input"])
    result = export_bundle(bundle_dir, ExportOptions(precisions=("fp32", "fp16"), parity_images=3,
                                                     accuracy=False, threads=2, max_batch=4,
                                                     timing_cache=tmp_path / "timing.cache"),
                           log=lambda s: None)
    assert result.reused == ["fp32", "fp16"] and {e["precision"] for e in result.engines} == {"fp32", "fp16"}
    inputs = {"images": ((1, 3, 64, 64), (1, 3, 64, 64), (4, 3, 64, 64)),
              **({"valid_box": ((1, 4), (1, 4), (4, 4))} if letterbox else {})}
    assert [b["profile"] for b in fake_gpu.BUILDS] == [inputs, inputs]
    assert all(b["problems"] == [] and b["flags"] == [] for b in fake_gpu.BUILDS)  # strongly typed
    bundle = load_bundle(bundle_dir)
    for entry in bundle.manifest["exports"]["engines"]:
        check = json.loads(bundle.file(entry["sidecar"]).read_text())["verification"]
        assert check["passed"] and check["images"] == 3
        assert check["valid_box"] == ("the images' letterbox boxes" if letterbox else None)
    assert (tmp_path / "timing.cache").is_file()

    # the runtime picks the engine and feeds the boxes; same maps as ONNX Runtime on the fp16 graph
    images, boxes = calibration_images(bundle, 3)
    assert (boxes is not None) == letterbox
    if letterbox:
        assert len({tuple(b) for b in boxes.tolist()}) > 1
    backend = select_backend(bundle_dir, bundle.manifest, "auto")
    assert backend.name == "tensorrt" and backend.precision == "fp16" and backend.max_batch == 4
    maps, scores = backend.infer(images, boxes)
    with OrtRunner(bundle.file("model.fp16.onnx")) as reference:
        ref_maps, ref_scores = reference.infer(images, boxes)
        if letterbox:   # the box changes what the graph computes, so feeding it is checked
            assert not np.allclose(reference.infer(images)[0], ref_maps)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    backend.close()
    assert fake_gpu.MEMORY == {}


def test_bench_times_the_tensorrt_backend_through_the_stub(fake_gpu, small_bundle, tmp_path):
    from edgestad.bench.cli import bench_command
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_command, [str(small_bundle), "--backends", "tensorrt", "--batch", "2",
                                                "--iterations", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["models"][0]["results"]
    assert row["backend"] == "tensorrt" and row["status"] == "ok", row
    (build,) = fake_gpu.BUILDS
    assert build["problems"] == [] and build["profile"]["images"][2] == (2, 3, 64, 64)
    assert set(build["profile"]) == set(build["inputs"])
    assert fake_gpu.MEMORY == {}


def test_a_profile_without_valid_box_fails_the_letterbox_build(fake_gpu, small_bundle, monkeypatch):
    """What the builder once did (a profile for ``images`` only) fails for a letterbox graph."""
    from edgestad.bundle import load_bundle
    from edgestad.contract import uses_valid_box
    bundle = load_bundle(small_bundle)
    graph, letterbox = bundle.file("model.onnx").read_bytes(), uses_valid_box(bundle.manifest["input"])
    trtb.build_engine(graph, "fp32", (3, 64, 64), log=lambda s: None)
    assert fake_gpu.BUILDS[-1]["problems"] == []

    def images_only(builder, network, input_shape, batch, max_batch):
        profile = builder.create_optimization_profile()
        profile.set_shape("images", (1, *input_shape), (batch, *input_shape), (max_batch, *input_shape))
        return profile
    monkeypatch.setattr(trtb, "_batch_profile", images_only)
    if letterbox:
        with pytest.raises(trtb.EngineBuildError, match="failed to build the fp32 engine"):
            trtb.build_engine(graph, "fp32", (3, 64, 64), log=lambda s: None)
        assert fake_gpu.LOG[-1] == "optimization profile is missing values for input 'valid_box'"
    else:
        trtb.build_engine(graph, "fp32", (3, 64, 64), log=lambda s: None)
