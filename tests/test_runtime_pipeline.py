"""End to end through the ONNX Runtime backend on real files, real sources and real failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from edgestad.bundle import add_files, load_bundle
from edgestad.runtime.backends import OnnxRuntimeBackend, select_backend
from edgestad.runtime.errors import BackendError, SourceError
from edgestad.runtime.pipeline import Pipeline
from edgestad.runtime.preprocess import InputSpec, Preprocessor
from edgestad.runtime.results import Thresholds
from edgestad.runtime.sinks import CallbackSink, EventLog
from edgestad.runtime.sources import Backoff, Frame, Source, SourceSpec
from test_runtime_toy import IMAGE_THRESHOLD, make_toy_bundle, write_folder, write_video

H, W = 48, 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(make_toy_bundle(tmp_path_factory.mktemp("bundle") / "b", H, W))


@pytest.fixture(scope="module")
def heavy_bundle(tmp_path_factory):
    # Convolutions make inference a few ms, slower than the synthetic camera below.
    return load_bundle(make_toy_bundle(tmp_path_factory.mktemp("heavy") / "b", 96, 96, conv_layers=3, channels=16))


def build(bundle, spec: SourceSpec, sinks=(), **kw):
    backend = select_backend(bundle.path, bundle.manifest, "onnxruntime")
    pre = Preprocessor(InputSpec.from_manifest(bundle.manifest), kw.pop("frame_size", None))
    thr = Thresholds.from_manifest(bundle.manifest)
    return Pipeline(spec, backend, pre, thr, sinks, **kw)


def reference_maps(bundle, frames_bgr):
    """Direct ONNX Runtime call with preprocessing written out independently of the runtime."""
    sess = ort.InferenceSession(str(bundle.path / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for img in frames_bgr:
        interp = cv2.INTER_AREA if (H <= img.shape[0] and W <= img.shape[1]) else cv2.INTER_LINEAR
        rgb = cv2.cvtColor(cv2.resize(img, (W, H), interpolation=interp), cv2.COLOR_BGR2RGB)
        amap, score = sess.run(None, {"images": rgb.transpose(2, 0, 1)[None].copy()})
        out.append((amap[0, 0], float(score[0])))
    return out


def test_video_end_to_end_matches_direct_onnxruntime(bundle, tmp_path):
    n = 40
    video = write_video(tmp_path / "v.avi", n)
    results = []
    pipe = build(bundle, SourceSpec("video", str(video)),
                 [CallbackSink(results.append), EventLog(tmp_path / "ev")])
    summary = pipe.run()

    assert summary.frames_captured == n and summary.frames_processed == n
    assert summary.frames_dropped == 0 and summary.frames_bad == 0
    assert [r.index for r in results] == list(range(n))  # in order, none lost

    cap = cv2.VideoCapture(str(video))
    decoded = [cap.read()[1] for _ in range(n)]
    for r, (amap, score) in zip(results, reference_maps(bundle, decoded), strict=True):
        assert r.anomaly_map.shape == (H, W)
        np.testing.assert_allclose(r.anomaly_map, amap, rtol=0, atol=1e-6)
        assert r.score == pytest.approx(score, abs=1e-6)
        assert r.is_ng == (score > IMAGE_THRESHOLD)
        assert r.latency_ms >= r.inference_ms >= 0

    ng = [r for r in results if r.is_ng]
    assert len(ng) == n // 5  # every 5th frame has the bright spot
    for r in ng:
        assert r.regions and r.regions[0].area > 0
        x, y, w, h = r.regions[0].bbox
        # the 30x30 spot drawn into the 160x120 frame, boxed in frame pixels
        assert 28 <= w <= 36 and 28 <= h <= 36
    events = [json.loads(line) for line in (tmp_path / "ev" / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop" and kinds.count("ng") == len(ng)
    assert events[-1]["reason"] == "end_of_source" and events[-1]["frames_processed"] == n


def test_folder_end_to_end_counts_bad_files(bundle, tmp_path):
    folder = write_folder(tmp_path / "imgs", 9)
    # Grayscale and 16-bit images are valid input (converted like training images) ...
    cv2.imwrite(str(folder / "img_0100_gray.png"), np.full((50, 70), 240, np.uint8))
    cv2.imwrite(str(folder / "img_0101_16bit.png"), np.full((50, 70, 3), 1000, np.uint16))
    # ... a truncated file is not: counted, reported, and the run goes on.
    data = (folder / "img_0001.png").read_bytes()
    (folder / "img_0050_truncated.png").write_bytes(data[: len(data) // 2])
    results, events = [], []
    pipe = build(bundle, SourceSpec("folder", str(folder)), [CallbackSink(results.append, events.append)])
    summary = pipe.run()
    names = [r.name for r in results]
    assert summary.frames_processed == 11 and summary.frames_bad == 1
    assert names == sorted(p.name for p in folder.iterdir() if "truncated" not in p.name)
    bad = [e for e in events if e["event"] == "bad_frame"]
    assert len(bad) == 1 and "img_0050_truncated.png" in bad[0]["error"]
    assert next(r for r in results if r.name == "img_0100_gray.png").is_ng  # bright grey = toy anomaly

    from edgestad.images import read_image

    sess = ort.InferenceSession(str(bundle.path / "model.onnx"), providers=["CPUExecutionProvider"])
    for r in results:
        x = read_image(folder / r.name, (H, W)).transpose(2, 0, 1)[None].copy()
        np.testing.assert_allclose(r.anomaly_map, sess.run(None, {"images": x})[0][0, 0], rtol=0, atol=1e-6)


def test_wrong_frame_size_is_counted_not_fatal(bundle, tmp_path):
    video = write_video(tmp_path / "v.avi", 6)
    pipe = build(bundle, SourceSpec("video", str(video)), frame_size=(100, 100))
    summary = pipe.run()
    assert summary.frames_bad == 6 and summary.frames_processed == 0


class SyntheticCamera(Source):
    """A live source producing frames as fast as it is read (like a camera whose consumer is slow)."""

    live = True
    description = "synthetic camera"

    def __init__(self, period_s: float = 0.0):
        self.period_s = period_s
        self.i = 0

    def open(self):
        pass

    def read(self):
        if self.period_s:
            time.sleep(self.period_s)
        img = np.full((120, 160, 3), 40 + self.i % 50, np.uint8)
        self.i += 1
        return Frame(img, self.i, time.time(), time.monotonic())


def test_live_source_keeps_latest_frame_and_counts_every_drop(heavy_bundle):
    pipe = build(heavy_bundle, SourceSpec("camera", "0"), source_factory=lambda: SyntheticCamera(0.0005),
                 max_frames=400)
    s = pipe.run()
    assert s.frames_captured == 400
    assert s.frames_dropped > 0  # inference is slower than the camera: old frames are dropped ...
    assert s.frames_processed + s.frames_dropped == s.frames_captured  # ... and every one is counted


def test_source_that_fails_and_recovers(bundle, tmp_path):
    """A stream (FFmpeg URL source) that is not there at first, then ends twice: the real
    reconnect code with a small backoff brings it back each time."""
    src = write_video(tmp_path / "src.avi", 20, spot_every=0)
    late = tmp_path / "late.avi"
    threading.Timer(0.3, shutil.copy, (src, late)).start()
    events = []
    pipe = build(bundle, SourceSpec("url", str(late)), [CallbackSink(lambda r: None, events.append)],
                 backoff=Backoff(initial=0.05, maximum=0.2), max_frames=50)
    s = pipe.run()
    c = pipe.source.counters
    assert s.frames_captured == 50 and s.frames_processed + s.frames_dropped == 50
    assert c.open_failures >= 2  # 0.3 s of failures at 0.05, 0.1, 0.2 s backoff
    assert c.losses == 2 and c.reconnects == 2  # 50 frames from a 20-frame stream
    kinds = [e["event"] for e in events]
    assert kinds.index("source_open_failed") < kinds.index("source_connected") < kinds.index("source_lost")
    assert kinds.count("source_reconnected") == 2
    assert "late.avi" in next(e for e in events if e["event"] == "source_open_failed")["error"]


def test_max_reconnects_gives_up_with_clear_error(bundle):
    pipe = build(bundle, SourceSpec("url", "/nonexistent/stream.avi"), backoff=Backoff(initial=0.01), max_reconnects=2)
    with pytest.raises(SourceError, match=r"cannot open url /nonexistent/stream.avi.*gave up after 3 attempts"):
        pipe.run()


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "edgestad.runtime.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_unreadable_camera_exits_nonzero(bundle):
    p = _cli(bundle.path, "--camera", "99", "--max-reconnects", "1", "--reconnect-initial", "0.01")
    assert p.returncode == 3
    assert "cannot open camera 99" in p.stderr and "gave up after 2 attempts" in p.stderr


def test_cli_missing_video_and_bad_options(bundle, tmp_path):
    p = _cli(bundle.path, "--video", tmp_path / "missing.avi")
    assert p.returncode == 3 and "video file not found" in p.stderr
    p = _cli(bundle.path, "--video", "a.avi", "--folder", str(tmp_path))
    assert p.returncode == 2 and "more than one source" in p.stderr
    p = _cli(tmp_path / "no_bundle", "--video", "a.avi")
    assert p.returncode == 4 and "not found" in p.stderr


def test_engine_for_another_gpu_is_refused_clearly(bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle.path, b)
    sidecar = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0", "precision": "fp16"}
    add_files(b, {"model.fp16.orin.engine": b"not a real engine", "model.fp16.orin.json": json.dumps(sidecar).encode()},
              manifest_updates={"exports": {"engines": [{"file": "model.fp16.orin.engine", "precision": "fp16"}]}})
    p = _cli(b, "--video", write_video(tmp_path / "v.avi", 3), "--backend", "tensorrt")
    assert p.returncode == 4 and "TensorRT backend unavailable" in p.stderr
    # auto falls back to ONNX Runtime and says why
    p = _cli(b, "--video", tmp_path / "v.avi", "--backend", "auto")
    assert p.returncode == 0 and "not using TensorRT" in p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["summary"]["frames_processed"] == 3


def test_graph_breaking_the_io_contract_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["images"], ["anomaly_map"])], "bad",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    with pytest.raises(BackendError, match=r"tensor\(uint8\).*no output 'image_score'"):
        OnnxRuntimeBackend(path)


def test_precision_choice(bundle):
    with pytest.raises(BackendError, match="no int8 ONNX graph in the bundle"):
        select_backend(bundle.path, bundle.manifest, "onnxruntime", "int8")
    b = select_backend(bundle.path, bundle.manifest, "auto")
    assert b.name == "onnxruntime:CPUExecutionProvider" and b.precision == "fp32"
    assert b.model_sha256 == bundle.manifest["files"]["model.onnx"]


def test_cli_outputs_and_sources_this_opencv_lacks(bundle, tmp_path):
    from edgestad.runtime.sources import opencv_has_gstreamer

    if not opencv_has_gstreamer():  # pip's OpenCV: a permanent error, no endless reconnecting
        p = _cli(bundle.path, "--gstreamer", "videotestsrc ! appsink", timeout=30)
        assert p.returncode == 3 and "no GStreamer support" in p.stderr
    try:
        cv2.namedWindow("probe")
        cv2.destroyAllWindows()
        return  # a GUI OpenCV with a display: --display works here
    except cv2.error:
        pass
    p = _cli(bundle.path, "--video", write_video(tmp_path / "v.avi", 3), "--display", "--events", tmp_path / "ev")
    assert p.returncode == 5 and "--display needs an OpenCV build with GUI support" in p.stderr
