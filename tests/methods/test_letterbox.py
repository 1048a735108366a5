"""Letterbox end to end: images of different aspect ratios are letterboxed automatically, the
padding is excluded from the map and the score in torch, in the exported graph and in the runtime."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")


def _crop_dataset(src: Path, dst: Path) -> Path:
    """The tiny demo set, every image cropped to a different aspect ratio (masks alike)."""
    shapes = [(64, 40), (40, 64), (64, 52), (30, 64)]
    k = 0
    for path in sorted(src.rglob("*.png")):
        rel = path.relative_to(src)
        if rel.parts[0] == "ground_truth":
            continue
        h, w = shapes[k % len(shapes)]
        k += 1
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
def letterbox_bundle(tiny_dataset, tmp_path_factory):
    from edgestad.export.exporter import ExportOptions, export_bundle
    from edgestad.methods import get_method
    from edgestad.methods.base import TrainSettings
    from edgestad.train.fit import train_bundle
    root = tmp_path_factory.mktemp("letterbox")
    data = _crop_dataset(tiny_dataset, root / "data")
    method = get_method("stfpm")
    bundle = train_bundle(data, root / "bundle", "stfpm",
                          method.make_config(input_size=(64, 64), resize="auto"),
                          TrainSettings(epochs=1, batch_size=4), progress=False, echo=lambda *_: None)
    export_bundle(bundle, ExportOptions(precisions=("fp32", "fp16"), parity_images=3, engine=False),
                  log=lambda s: None)
    return data, bundle


def test_auto_resize_letterboxes_images_of_different_aspect_ratios(letterbox_bundle):
    from edgestad.bundle import load_bundle
    _, bundle = letterbox_bundle
    manifest = load_bundle(bundle).manifest
    assert manifest["input"]["resize"] == "letterbox"
    assert manifest["method_config"]["resize"] == "letterbox"
    assert manifest["input"]["pad_value"] == 114


def test_graph_takes_valid_box_and_matches_torch_on_real_boxes(letterbox_bundle):
    from edgestad.bundle import load_bundle
    from edgestad.data import good_images, load_images
    from edgestad.methods import load_model
    from edgestad.methods.common.scoring import parse_image_score, topk_count
    from edgestad.onnx_session import ort_session, run_session
    data, bundle_path = letterbox_bundle
    bundle = load_bundle(bundle_path)
    images, boxes = load_images(good_images(data)[:4], (64, 64), resize="letterbox", with_boxes=True)
    assert len({tuple(b) for b in boxes.tolist()}) > 1        # really different boxes
    batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    session = ort_session(bundle.file("model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images", "valid_box"]
    maps, scores = run_session(session, batch, boxes=boxes)
    model = load_model(bundle)
    with torch.no_grad():
        ref_maps, ref_scores = model(torch.from_numpy(batch), torch.from_numpy(boxes))
    np.testing.assert_allclose(maps, ref_maps[:, 0].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():   # the map's part of the image score (fused with the global branch's)
        _, map_scores, _ = model.scores(torch.from_numpy(batch), torch.from_numpy(boxes))
    for amap, score, box in zip(maps, map_scores.numpy(), boxes.astype(int)):
        inside = amap[box[0]:box[2], box[1]:box[3]]
        outside = np.ones_like(amap, bool)
        outside[box[0]:box[2], box[1]:box[3]] = False
        # the bundle's rule (stfpm: mean of the top 1 % of the valid pixels; k from the whole map)
        kind, fraction = parse_image_score(bundle.manifest["method_config"]["image_score"])
        k = 1 if kind == "max" else topk_count(fraction, *amap.shape)
        expected = np.sort(inside.ravel())[::-1][:k].mean()
        assert score == pytest.approx(expected, rel=1e-5)
        assert np.all(amap[outside] == inside.min())


def test_runtime_letterboxes_frames_and_crops_the_map(letterbox_bundle):
    from edgestad.bundle import load_bundle
    from edgestad.data import read_image
    from edgestad.onnx_session import ort_session, run_session
    from edgestad.runtime.backends import OnnxRuntimeBackend
    from edgestad.runtime.preprocess import InputSpec, Preprocessor
    data, bundle_path = letterbox_bundle
    bundle = load_bundle(bundle_path)
    pre = Preprocessor(InputSpec.from_manifest(bundle.manifest))
    path = sorted((data / "train" / "good").glob("*.png"))[1]
    rgb = read_image(path)
    tensor = pre(rgb, "RGB")
    box = pre.valid_box(rgb.shape[:2])
    assert box is not None and tuple(box) != (0, 0, 64, 64)
    backend = OnnxRuntimeBackend(bundle.file("model.onnx"), intra_op_threads=1)
    maps, scores = backend.infer(tensor[None], box[None])
    ref_maps, ref_scores = run_session(ort_session(bundle.file("model.onnx")), tensor[None], boxes=box[None])
    np.testing.assert_array_equal(maps, ref_maps)


def test_evaluate_letterbox_bundle_on_the_onnx_graph(letterbox_bundle, tmp_path):
    from click.testing import CliRunner
    from edgestad.cli import main
    data, bundle = letterbox_bundle
    r = CliRunner().invoke(main, ["evaluate", str(bundle), str(data), "--out", str(tmp_path),
                                  "--backend", "onnx"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["resize"] == "letterbox" and 0 <= report["au_pro"] <= 1
