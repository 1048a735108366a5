"""Every registered method, through the whole flow on a tiny input:

build → output shapes → a few training steps lower the loss → generic train driver (calibrate,
thresholds, bundle) → export fp32/fp16/int8 → ONNX Runtime parity with torch → the runtime
backend runs the graph → `edgestad evaluate --backend onnx`.

A new method gets all of this by registering; only a method that needs files to build (Uninformed
Students' teachers) has an entry in TINY below.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402

from edgestad.methods import get_method, method_names  # noqa: E402
from edgestad.methods.base import FitContext, TrainSettings  # noqa: E402

SIZE = (64, 64)


def tiny_config(name: str, tiny_teachers) -> tuple[object, dict]:
    """(config, options) of a tiny, fast instance of a method."""
    method = get_method(name)
    if name == "uninformed_students":
        return (method.make_config(patch_sizes=(17,), num_students=2, input_size=SIZE),
                {"teachers": (str(tiny_teachers[17]),), "crop_size": 32})
    if name == "resnet_students":
        return method.make_config(input_size=SIZE, student_channels=(8, 8, 8)), {}
    if name == "rstpm":
        return (method.make_config(input_size=SIZE, recon_channels=(16, 16, 16), disc_channels=(8, 8, 8)),
                {"disc_epochs": 1})
    if name == "stfpm_ae":
        return method.make_config(input_size=SIZE), {"ae_pretrain_epochs": 1}
    return method.make_config(input_size=SIZE), {}


@pytest.fixture(scope="module")
def train_images(tiny_dataset):
    from edgestad.data import good_images, load_images
    return load_images(good_images(tiny_dataset)[:8], SIZE)


@pytest.mark.parametrize("name", method_names())
def test_model_maps_images_to_map_and_score(name, tiny_teachers):
    method = get_method(name)
    config, options = tiny_config(name, tiny_teachers)
    model = method.build(method.prepare(config, options)).eval()
    images = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8)
    with torch.no_grad():
        amap, score = model(images)
    assert amap.shape == (2, 1, *SIZE) and amap.dtype == torch.float32
    assert score.shape == (2,)
    assert torch.isfinite(amap).all() and torch.isfinite(score).all()


@pytest.mark.parametrize("name", method_names())
def test_a_few_training_steps_lower_the_loss(name, tiny_teachers, train_images, tmp_path):
    method = get_method(name)
    config, options = tiny_config(name, tiny_teachers)
    config = method.prepare(config, options)
    torch.manual_seed(0)
    model = method.build(config)
    lr = {"stfpm": 0.1}.get(name, method.defaults["lr"] * (10 if name == "uninformed_students" else 1))
    ctx = FitContext(epochs=4, batch_size=4, lr=lr, checkpoint=tmp_path / "ck.pt", progress=False,
                     options=options)
    history = method.fit(model, train_images, ctx)
    losses = [h["loss"] for h in history]
    assert len(losses) >= 4
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", method_names())
def test_train_export_parity_runtime_evaluate(name, tiny_dataset, tiny_teachers, tmp_path):
    from edgestad.bundle import load_bundle
    from edgestad.cli import main
    from edgestad.export.exporter import ExportOptions, export_bundle
    from edgestad.onnx_session import ort_session, run_session
    from edgestad.runtime.backends import OnnxRuntimeBackend
    from edgestad.train.fit import train_bundle

    config, options = tiny_config(name, tiny_teachers)
    settings = TrainSettings(epochs=1, batch_size=4, options=options)
    bundle_path = train_bundle(tiny_dataset, tmp_path / "bundle", name, config, settings,
                               progress=False, echo=lambda *_: None)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    assert manifest["method"] == name
    assert manifest["backbone"]["name"]
    thresholds = manifest["thresholds"]
    assert np.isfinite(thresholds["pixel"]) and np.isfinite(thresholds["image"])

    result = export_bundle(bundle_path, ExportOptions(precisions=("fp32", "fp16", "int8"),
                                                      calibration_images=4, parity_images=3,
                                                      engine=False), log=lambda s: None)
    report = result.report
    assert report["graphs"]["fp32"]["parity"]["vs_torch"]["max_rel_diff_map"] <= 1e-4
    for precision in ("fp16", "int8"):
        assert report["graphs"][precision]["parity"]["vs_fp32_graph"]["max_rel_diff_map"] < 0.5
        assert report["graphs"][precision]["trt_compat"]["checked_nodes"] > 0

    bundle = load_bundle(bundle_path)
    images = np.stack([np.random.default_rng(i).integers(0, 256, (3, *SIZE), dtype=np.uint8)
                       for i in range(2)])
    backend = OnnxRuntimeBackend(bundle.file("model.onnx"), intra_op_threads=1)
    maps, scores = backend.infer(images)
    ref_maps, ref_scores = run_session(ort_session(bundle.file("model.onnx")), images)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-7)

    out = tmp_path / "eval"
    run = CliRunner().invoke(main, ["evaluate", str(bundle_path), str(tiny_dataset), "--out", str(out),
                                    "--backend", "onnx", "--precision", "fp16"])
    assert run.exit_code == 0, run.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["precision"] == "fp16"
    assert 0.0 <= metrics["au_pro"] <= 1.0
    assert metrics["decisions_at_bundle_threshold"]["defective_total"] > 0
    assert name in run.output        # the method (and its backbone) is shown with the result
