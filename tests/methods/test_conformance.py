"""Every registered method (``list_methods()``), through the whole flow on its tiny instance
(``Method.tiny``), with no per-method branch here: a new method gets all of this by existing.

- build: uint8 images (with and without letterbox boxes) → map N×1×H×W and score N;
- fit: a few epochs lower the loss, and a run interrupted after its first epoch resumes to the
  same weights and history, bit for bit;
- the generic train driver on images of different aspect ratios: letterbox chosen, training
  interrupted and resumed, score statistics, thresholds, bundle;
- export fp32/fp16/int8, ONNX Runtime parity with torch on real boxes (padding excluded from the
  map and the score), the runtime letterboxes a frame and runs the graph, `edgestad evaluate
  --backend onnx`.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402

from edgestad.methods import get_method, method_names  # noqa: E402
from edgestad.methods.base import FitContext, TrainSettings  # noqa: E402
from edgestad.methods.common.training import TrainingLoop  # noqa: E402

SIZE = (64, 64)


def tiny(name: str, workdir: Path):
    """(method, config, options, lr) of the method's tiny instance."""
    method = get_method(name)
    spec = method.tiny(workdir)
    config = method.make_config(**spec["settings"])
    return method, config, spec["options"], spec["lr"] or method.defaults["lr"]


@pytest.fixture(scope="module")
def train_images(tiny_dataset):
    from edgestad.datasets import good_images, load_images
    return load_images(good_images(tiny_dataset)[:8], SIZE)


def _crop_dataset(src: Path, dst: Path) -> Path:
    """The tiny demo set, every image cropped to a different aspect ratio (masks alike); also
    used by test_export.py."""
    shapes = [(64, 40), (40, 64), (64, 52), (30, 64)]
    for k, path in enumerate(p for p in sorted(src.rglob("*.png"))
                             if p.relative_to(src).parts[0] != "ground_truth"):
        rel = path.relative_to(src)
        h, w = shapes[k % len(shapes)]
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:h, :w])
        if rel.parts[0] == "test" and rel.parts[1] != "good":
            mask = src / "ground_truth" / rel.parts[1] / (path.stem + "_mask.png")
            mout = dst / "ground_truth" / rel.parts[1] / mask.name
            mout.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mout), cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)[:h, :w])
    return dst


@pytest.fixture(scope="module")
def letterbox_data(tiny_dataset, tmp_path_factory) -> Path:
    return _crop_dataset(tiny_dataset, tmp_path_factory.mktemp("letterbox") / "data")


@pytest.fixture
def interrupt_after_first_epoch(monkeypatch):
    """Training dies (KeyboardInterrupt) right after its first checkpoint is written."""
    real = TrainingLoop._save
    calls = {"n": 0}

    def dies(self, unfinished, entry):
        real(self, unfinished, entry)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingLoop, "_save", dies)
    return lambda: monkeypatch.setattr(TrainingLoop, "_save", real)


@pytest.mark.parametrize("name", method_names())
def test_model_maps_images_to_map_and_score(name, tmp_path):
    method, config, options, _ = tiny(name, tmp_path)
    images = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8)
    boxes = torch.tensor([[0, 8, 64, 56], [16, 0, 48, 64]], dtype=torch.float32)
    for resize, box in (("area_or_linear", None), ("letterbox", boxes)):
        model = method.build(method.prepare(config.replace(resize=resize), options)).eval()
        with torch.no_grad():
            amap, score = model(images) if box is None else model(images, box)
        assert amap.shape == (2, 1, *SIZE) and amap.dtype == torch.float32
        assert score.shape == (2,)
        assert torch.isfinite(amap).all() and torch.isfinite(score).all()
    valid = model.valid_mask(boxes)                  # the padding: the image's lowest valid value
    for m, v in zip(amap, valid):
        assert torch.all(m[~v] == m[v].min())


@pytest.mark.parametrize("name", method_names())
def test_a_few_epochs_lower_the_loss_and_an_interrupted_run_resumes_exactly(
        name, train_images, tmp_path, interrupt_after_first_epoch):
    method, config, options, lr = tiny(name, tmp_path)
    config = method.prepare(config, options)

    def fit(checkpoint):
        torch.manual_seed(0)
        model = method.build(config)
        ctx = FitContext(epochs=4, batch_size=4, lr=lr, checkpoint=checkpoint, progress=False,
                         options=options)
        return model, method.fit(model, train_images, ctx)

    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "resumed.pt")
    assert (tmp_path / "resumed.pt").exists()
    interrupt_after_first_epoch()                   # back to the real loop
    resumed, resumed_history = fit(tmp_path / "resumed.pt")
    straight, history = fit(tmp_path / "straight.pt")
    losses = [h["loss"] for h in history]
    assert len(losses) >= 4
    assert losses[-1] < losses[0], losses
    assert [(h["stage"], h["loss"]) for h in resumed_history] == [(h["stage"], h["loss"]) for h in history]
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key
        # the loop trains channels-last on the CPU and hands the model back in the plain layout
        # (what a bundle's safetensors and the ONNX export expect)
        assert value.is_contiguous(), key


@pytest.mark.parametrize("name", method_names())
def test_letterbox_train_resume_export_parity_runtime_evaluate(name, letterbox_data, tmp_path,
                                                               interrupt_after_first_epoch):
    from edgestad.bundle import load_bundle
    from edgestad.cli import main
    from edgestad.images import read_image
    from edgestad.datasets import good_images, load_images
    from edgestad.export.exporter import ExportOptions, export_bundle
    from edgestad.methods import load_model
    from edgestad.methods.common.scoring import parse_image_score, topk_count
    from edgestad.runner import OrtRunner, run_graph
    from edgestad.runtime.backends import OnnxRuntimeBackend
    from edgestad.runtime.preprocess import InputSpec, Preprocessor
    from edgestad.train.fit import train_bundle

    method, config, options, _ = tiny(name, tmp_path)
    lines = []

    def train():
        settings = TrainSettings(epochs=2, batch_size=4, options=dict(options))
        return train_bundle(letterbox_data, tmp_path / "bundle", name, config.replace(resize="auto"),
                            settings, progress=False, echo=lines.append)

    with pytest.raises(KeyboardInterrupt):
        train()
    interrupt_after_first_epoch()
    bundle_path = train()
    assert any(line.startswith("resuming from epoch 1 of 2") or line.startswith("resuming after 1 ")
               for line in lines), lines
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    assert manifest["method"] == name and manifest["backbone"]["name"]
    assert manifest["input"]["resize"] == manifest["method_config"]["resize"] == "letterbox"
    assert manifest["input"]["pad_value"] == 114
    assert len(manifest["provenance"]["training"]["history"]) >= 2
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

    # the graph takes the valid box and matches torch on real boxes; padding never counts
    bundle = load_bundle(bundle_path)
    images, boxes = load_images(good_images(letterbox_data)[:4], SIZE, resize="letterbox",
                                with_boxes=True)
    assert len({tuple(b) for b in boxes.tolist()}) > 1        # really different boxes
    batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    runner = OrtRunner(bundle.file("model.onnx")).activate()
    assert [i.name for i in runner.session.get_inputs()] == ["images", "valid_box"]
    maps, scores = runner.infer(batch, boxes)
    model = load_model(bundle)
    with torch.no_grad():
        ref_maps, ref_scores = model(torch.from_numpy(batch), torch.from_numpy(boxes))
        _, map_scores, _ = model.scores(torch.from_numpy(batch), torch.from_numpy(boxes))
    ref_maps, ref_scores = ref_maps[:, 0].numpy(), ref_scores.numpy()
    # within 1e-4 of the map's (the scores') scale, the export's own parity measure
    np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=1e-4 * np.abs(ref_maps).max())
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-4 * np.abs(ref_scores).max())
    kind, fraction = parse_image_score(manifest["method_config"]["image_score"])
    margin = manifest["method_config"].get("score_margin", 0)
    for amap, score, box in zip(maps, map_scores.numpy(), boxes.astype(int)):
        inside = amap[box[0]:box[2], box[1]:box[3]]
        outside = np.ones_like(amap, bool)
        outside[box[0]:box[2], box[1]:box[3]] = False
        # the map's part of the image score: the bundle's rule over the valid pixels only, less
        # the method's edge margin along the image's own edges
        scored = amap[box[0] + margin:box[2] - margin, box[1] + margin:box[3] - margin]
        k = min(scored.size, 1 if kind == "max" else topk_count(fraction, *amap.shape))
        assert score == pytest.approx(np.sort(scored.ravel())[::-1][:k].mean(), rel=1e-5)
        assert np.all(amap[outside] == inside.min())

    # the runtime letterboxes a frame as training did and runs the graph with its box
    pre = Preprocessor(InputSpec.from_manifest(manifest))
    rgb = read_image(sorted((letterbox_data / "train" / "good").glob("*.png"))[1])
    tensor, box = pre(rgb, "RGB"), pre.valid_box(rgb.shape[:2])
    assert box is not None and tuple(box) != (0, 0, *SIZE)
    backend = OnnxRuntimeBackend(bundle.file("model.onnx"), intra_op_threads=1)
    maps, scores = backend.infer(tensor[None], box[None])
    ref_maps, ref_scores = run_graph(bundle.file("model.onnx"), tensor[None], box[None])
    np.testing.assert_array_equal(maps, ref_maps)
    np.testing.assert_array_equal(scores, ref_scores)

    out = tmp_path / "eval"
    run = CliRunner().invoke(main, ["evaluate", str(bundle_path), str(letterbox_data), "--out",
                                    str(out), "--backend", "onnx", "--precision", "fp16"])
    assert run.exit_code == 0, run.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["precision"] == "fp16"
    assert metrics["resize"] == "letterbox" and 0.0 <= metrics["au_pro"] <= 1.0
    assert metrics["decisions_at_bundle_threshold"]["defective_total"] > 0
    assert name in run.output        # the method (and its backbone) is shown with the result
