"""Real small graphs and bundles that follow the edgestad graph I/O contract, for runtime tests
and benchmarks (studies/runtime_*.py import this file).

``toy_graph``: images uint8 N x 3 x H x W -> Cast -> /255 -> mean over channels ->
``anomaly_map`` N x 1 x H x W (so a bright spot is an "anomaly"), ``image_score`` = max of the map.
``conv_layers > 0`` inserts 3x3 convolutions so inference dominates the frame time (overhead
benchmark). The bundle is written with edgestad.bundle, with thresholds.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgestad.bundle import load_bundle, write_bundle

PIXEL_THRESHOLD = 0.8
IMAGE_THRESHOLD = 0.8


def toy_graph(height: int = 64, width: int = 64, conv_layers: int = 0, channels: int = 16, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["xf", "c255"], ["x01"]),
    ]
    inits = [numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
             numpy_helper.from_array(np.array([1], np.int64), "axis_c"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes_all")]
    x = "x01"
    for i in range(conv_layers):
        cin = 3 if i == 0 else channels
        w = (rng.standard_normal((channels, cin, 3, 3)) * (1.0 / np.sqrt(9 * cin))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x = f"r{i}"
    if conv_layers:
        # Keep the toy's meaning (bright = anomalous): add the conv stack's mean with a tiny weight.
        nodes.append(helper.make_node("ReduceMean", [x, "axis_c"], ["feat"], keepdims=1))
        nodes.append(helper.make_node("Mul", ["feat", "tiny"], ["feat_s"]))
        inits.append(numpy_helper.from_array(np.array(1e-3, np.float32), "tiny"))
        nodes.append(helper.make_node("ReduceMean", ["x01", "axis_c"], ["bright"], keepdims=1))
        nodes.append(helper.make_node("Add", ["bright", "feat_s"], ["anomaly_map"]))
    else:
        nodes.append(helper.make_node("ReduceMean", ["x01", "axis_c"], ["anomaly_map"], keepdims=1))
    nodes.append(helper.make_node("ReduceMax", ["anomaly_map", "axes_all"], ["image_score"], keepdims=0))
    graph = helper.make_graph(
        nodes, "edgestad_toy",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, height, width])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, height, width]),
         helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["batch"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgestad-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_toy_bundle(path: Path, height: int = 64, width: int = 64, conv_layers: int = 0,
                    channels: int = 16) -> Path:
    manifest = {
        "method": "uninformed_students",
        "method_config": {"toy": True, "conv_layers": conv_layers},
        "input": {"height": height, "width": width, "channels": 3, "color": "RGB", "layout": "NCHW",
                  "dtype": "uint8", "resize": "area_or_linear", "mean": [0.485, 0.456, 0.406],
                  "std": [0.229, 0.224, 0.225]},
        "thresholds": {"pixel": PIXEL_THRESHOLD, "image": IMAGE_THRESHOLD, "rule": {"toy": "brightness"}},
        "image_score": "max",
        "exports": {"onnx": {"fp32": "model.onnx"}},
    }
    weights = {"toy.bias": np.zeros(1, np.float32)}
    write_bundle(path, manifest, weights,
                 extra_files={"model.onnx": toy_graph(height, width, conv_layers, channels)})
    return Path(path)


def frame_with_spot(i: int, width: int = 160, height: int = 120, spot: bool = False) -> np.ndarray:
    """A dark textured BGR frame; with ``spot`` a bright square (a toy 'defect')."""
    rng = np.random.default_rng(i)
    img = rng.integers(10, 90, size=(height, width, 3), dtype=np.uint8)
    img[:, :, 0] = (img[:, :, 0] // 2 + i % 90) % 90  # frames differ, channels differ (colour order matters)
    if spot:
        x, y = (i * 7) % (width - 40), (i * 5) % (height - 40)
        img[y : y + 30, x : x + 30] = 250
    return img


def write_video(path: Path, n: int, width: int = 160, height: int = 120, spot_every: int = 5, fps: float = 30.0) -> Path:
    """MJPG .avi (pip's OpenCV writes and reads it with its bundled FFmpeg)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), f"cannot write {path}"
    for i in range(n):
        writer.write(frame_with_spot(i, width, height, spot=spot_every > 0 and i % spot_every == 0))
    writer.release()
    return Path(path)


def write_folder(folder: Path, n: int, width: int = 160, height: int = 120, spot_every: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"img_{i:04d}.png"), frame_with_spot(i, width, height, spot=i % spot_every == 0))
    return folder


# --------------------------------------------------------------------------- its own tests


def test_toy_bundle_follows_the_graph_contract(tmp_path):
    import onnxruntime as ort

    bundle = load_bundle(make_toy_bundle(tmp_path / "b", 32, 48))
    sess = ort.InferenceSession(str(bundle.path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 3, 32, 48), np.uint8)
    x[1, :, 3, 4] = 255
    amap, score = sess.run(["anomaly_map", "image_score"], {"images": x})
    assert amap.shape == (2, 1, 32, 48) and amap.dtype == np.float32
    assert score.shape == (2,) and score[0] == 0.0 and score[1] == 1.0
