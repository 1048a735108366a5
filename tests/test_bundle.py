"""Bundle format: round trip, integrity checks, atomic writes, archives, config lookup."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgestad import bundle as B
from edgestad import files as F
from edgestad.bundle import BundleError


def _manifest() -> dict:
    return {
        "method": "uninformed_students",
        "method_config": {"patch_sizes": [17, 33, 65], "num_students": 3, "descriptor_dim": 128},
        "input": {"height": 64, "width": 96, "channels": 3, "color": "RGB", "layout": "NCHW",
                  "dtype": "uint8", "resize": "area_or_linear",
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "thresholds": {"pixel": np.float32(0.25), "image": 1.5, "rule": {"pixel_fpr": 0.001}},
        "provenance": {"category": "bottle"},
    }


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "students.0.conv1.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "students.0.conv1.bias": rng.standard_normal(8).astype(np.float16),
        "teacher.bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "mask": rng.random((4, 4)) > 0.5,
        "lut": np.arange(256, dtype=np.uint8),
        "strided": rng.standard_normal((6, 6))[::2, ::3],  # non-contiguous input must still work
    }


def _assert_weights_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, arr in want.items():
        assert got[key].dtype == arr.dtype, key
        assert got[key].shape == arr.shape, key
        assert got[key].tobytes() == arr.tobytes(), key  # bit-exact


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return B.write_bundle(tmp_path / "bundle", _manifest(), _weights(),
                          extra_files={"notes.txt": b"hello\n"})


def _hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_weights_and_manifest(tmp_path: Path) -> None:
    src_manifest = _manifest()
    weights = _weights()
    path = B.write_bundle(tmp_path / "b", src_manifest, weights,
                          extra_files={"notes.txt": b"hi", "copied.bin": _write(tmp_path / "src.bin", b"\x00\x01")})
    assert "files" not in src_manifest  # caller's dict is not modified

    b = B.load_bundle(path)
    _assert_weights_equal(b.weights(), weights)
    assert b.weights() is b.weights()  # cached
    assert b.weights()["lut"].flags.writeable  # torch.from_numpy needs writable arrays

    m = b.manifest
    assert m["format"] == B.FORMAT == "edgestad-bundle"
    assert m["format_version"] == B.FORMAT_VERSION == 2
    assert m["method"] == "uninformed_students"
    assert m["code_version"]
    created = dt.datetime.fromisoformat(m["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert set(m["files"]) == {"weights.safetensors", "notes.txt", "copied.bin"}
    for name, digest in m["files"].items():
        assert digest == F.sha256_file(path / name)
    assert b.file("copied.bin").read_bytes() == b"\x00\x01"
    assert b.input_size == (64, 96)
    assert b.thresholds["pixel"] == pytest.approx(0.25)  # numpy scalar was stored as a number

    text = (path / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert _hidden_leftovers(tmp_path) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="method_config"):
        B.write_bundle(tmp_path / "b", {"method": "x", "input": {}}, _weights())
    with pytest.raises(BundleError, match="not a numpy array"):
        B.write_bundle(tmp_path / "b", _manifest(), {"w": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(BundleError, match="invalid file name"):
        B.write_bundle(tmp_path / "b", _manifest(), _weights(), extra_files={"../evil": b"x"})
    assert not (tmp_path / "b").exists()


def test_thresholds_missing_is_a_clear_error(tmp_path: Path) -> None:
    manifest = _manifest()
    del manifest["thresholds"]
    b = B.load_bundle(B.write_bundle(tmp_path / "b", manifest, _weights()))
    with pytest.raises(BundleError, match="training did not set them"):
        _ = b.thresholds


# ---------------------------------------------------------------------------------------------
# Atomicity


def test_failed_rewrite_leaves_old_bundle_intact(bundle_dir: Path, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    real_write = B.write_new_file
    calls = []

    def failing_write(dst, src):
        calls.append(dst)
        if len(calls) == 2:  # weights written, first extra file fails
            raise OSError(28, "No space left on device (simulated)")
        return real_write(dst, src)

    monkeypatch.setattr(B, "write_new_file", failing_write)
    with pytest.raises(OSError, match="simulated"):
        B.write_bundle(bundle_dir, _manifest(), _weights(seed=1), extra_files={"model.onnx": b"new"})
    monkeypatch.undo()

    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == before
    _assert_weights_equal(B.load_bundle(bundle_dir).weights(), _weights())
    assert _hidden_leftovers(bundle_dir.parent) == []


def test_rewrite_replaces_old_bundle_completely(bundle_dir: Path) -> None:
    B.write_bundle(bundle_dir, _manifest(), _weights(seed=2))
    b = B.load_bundle(bundle_dir)
    _assert_weights_equal(b.weights(), _weights(seed=2))
    assert not (bundle_dir / "notes.txt").exists()  # no files left over from the old bundle
    assert _hidden_leftovers(bundle_dir.parent) == []


def test_write_refuses_to_replace_a_non_bundle_directory(tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "image.png").write_bytes(b"keep me")
    with pytest.raises(BundleError, match="refusing"):
        B.write_bundle(precious, _manifest(), _weights())
    assert (precious / "image.png").read_bytes() == b"keep me"
    assert _hidden_leftovers(tmp_path) == []


def test_atomic_write_helpers(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    F.atomic_write_json(target, {"b": np.int64(2), "a": np.array([1.5])})
    assert target.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 2\n}\n'
    F.atomic_write_bytes(target, b"raw")
    assert target.read_bytes() == b"raw"
    with pytest.raises(F.JsonWriteError, match="JSON"):
        F.atomic_write_json(target, {"x": float("nan")})
    assert target.read_bytes() == b"raw"
    assert _hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# add_files


def test_add_files_updates_hashes_and_manifest(bundle_dir: Path, tmp_path: Path) -> None:
    onnx_src = _write(tmp_path / "exported.onnx", b"onnx-bytes-v1")
    b = B.add_files(bundle_dir, {"model.onnx": onnx_src, "export_report.json": b"{}"},
                    manifest_updates={"exports": {"onnx": {"opset": 17}},
                                      "provenance": {"exported_by": "test"}},
                    remove=["notes.txt"])
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m == b.manifest
    assert m["files"]["model.onnx"] == F.sha256_file(bundle_dir / "model.onnx")
    assert m["files"]["export_report.json"] == F.sha256_file(bundle_dir / "export_report.json")
    assert "notes.txt" not in m["files"] and not (bundle_dir / "notes.txt").exists()
    assert m["provenance"] == {"category": "bottle", "exported_by": "test"}  # deep-merged
    assert m["exports"] == {"onnx": {"opset": 17}}

    # Replacing a file updates its hash; the bundle still verifies.
    B.add_files(bundle_dir, {"model.onnx": b"onnx-bytes-v2"},
                manifest_updates={"exports": {"fp16": {"ok": True}}})
    b = B.load_bundle(bundle_dir)
    assert b.file("model.onnx").read_bytes() == b"onnx-bytes-v2"
    assert b.manifest["exports"] == {"onnx": {"opset": 17}, "fp16": {"ok": True}}
    assert _hidden_leftovers(bundle_dir) == []


@pytest.mark.parametrize("name", ["../evil.onnx", "sub/model.onnx", "..", "/abs.onnx", "a\\b", ".hidden"])
def test_add_files_rejects_non_plain_names(bundle_dir: Path, name: str) -> None:
    with pytest.raises(BundleError, match="invalid file name"):
        B.add_files(bundle_dir, {name: b"x"})
    assert not (bundle_dir.parent / "evil.onnx").exists()


def test_add_files_rejects_managed_keys_and_manifest(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="format_version"):
        B.add_files(bundle_dir, {}, manifest_updates={"format_version": 2})
    with pytest.raises(BundleError, match="manifest.json"):
        B.add_files(bundle_dir, {"manifest.json": b"{}"})
    B.load_bundle(bundle_dir)  # untouched and still valid


# ---------------------------------------------------------------------------------------------
# Verification failures


def test_tampered_file_is_reported(bundle_dir: Path) -> None:
    (bundle_dir / "notes.txt").write_bytes(b"tampered\n")
    with pytest.raises(BundleError, match=r"sha256.*notes\.txt") as exc:
        B.load_bundle(bundle_dir)
    assert str(bundle_dir) in str(exc.value)
    B.load_bundle(bundle_dir, verify=False)  # structure-only load still works for inspection


def test_file_tampered_after_load_is_caught(bundle_dir: Path) -> None:
    b = B.load_bundle(bundle_dir)
    (bundle_dir / "weights.safetensors").write_bytes((bundle_dir / "weights.safetensors").read_bytes() + b" ")
    with pytest.raises(BundleError, match="sha256 mismatch for file weights.safetensors"):
        b.weights()
    with pytest.raises(BundleError, match="not listed"):
        b.file("model.onnx")


def test_missing_file_is_reported(bundle_dir: Path) -> None:
    (bundle_dir / "notes.txt").unlink()
    with pytest.raises(BundleError, match=r"notes\.txt.*missing"):
        B.load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="not found"):
        B.load_bundle(bundle_dir.parent / "nope")
    (bundle_dir / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        B.load_bundle(bundle_dir)


def _edit_manifest(bundle_dir: Path, **changes) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            m.pop(key)
        else:
            m[key] = value
    F.atomic_write_json(bundle_dir / "manifest.json", m)


def test_unknown_format(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, format="someone-elses-bundle")
    with pytest.raises(BundleError, match="unknown format 'someone-elses-bundle'"):
        B.load_bundle(bundle_dir)


def test_newer_format_version(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, format_version=B.FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match="newer than this edgestad supports"):
        B.load_bundle(bundle_dir)


def test_missing_manifest_keys(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, method_config=None, input=None)
    with pytest.raises(BundleError, match=r"missing required keys \['method_config', 'input'\]"):
        B.load_bundle(bundle_dir)


class _SideEffect:
    """Unpickling this touches a marker file: proof that a pickle was (not) executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_weights_are_rejected_not_unpickled(bundle_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    payload = pickle.dumps({"w": _SideEffect(marker)}, protocol=4)
    # The attacker also fixes the hash, so only the content check stands in the way.
    (bundle_dir / "weights.safetensors").write_bytes(payload)
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["files"]["weights.safetensors"] = F.sha256_file(bundle_dir / "weights.safetensors")
    F.atomic_write_json(bundle_dir / "manifest.json", m)

    with pytest.raises(BundleError, match=r"weights\.safetensors is a Python pickle"):
        B.load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="pickle"):
        B.load_bundle(bundle_dir, verify=False).weights()
    with pytest.raises(BundleError, match="pickle"):
        B.add_files(bundle_dir, {"weights.safetensors": payload})
    with pytest.raises(BundleError, match="not a safetensors file"):
        B.add_files(bundle_dir, {"weights.safetensors": b"\x05\x00\x00\x00\x00\x00\x00\x00hello"})
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Archives


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip", ".tar"])
def test_archive_round_trip(bundle_dir: Path, tmp_path: Path, suffix: str) -> None:
    (bundle_dir / ".stray.tmp").write_bytes(b"leftover")  # unlisted files are not shipped
    archive = B.pack_bundle(bundle_dir, tmp_path / "dist" / f"bottle{suffix}")
    b = B.load_bundle(archive)
    assert b.source == archive
    assert b.path != bundle_dir
    _assert_weights_equal(b.weights(), _weights())
    assert b.manifest == B.load_bundle(bundle_dir).manifest
    assert b.file("notes.txt").read_bytes() == b"hello\n"
    assert not (b.path / ".stray.tmp").exists()
    assert B.load_bundle(archive).path == b.path  # extracted once, then reused


def test_archive_of_a_directory_is_accepted(bundle_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "manual.tar.gz"  # like `tar czf manual.tar.gz bundle/`
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(bundle_dir, arcname="bundle")
    _assert_weights_equal(B.load_bundle(archive).weights(), _weights())


def _tar_with(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo("link")
            info.type = tarfile.SYMTYPE
            info.linkname = symlink
            tf.addfile(info)
    return path


def test_archive_with_parent_member_is_rejected(bundle_dir: Path, tmp_path: Path) -> None:
    good = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    evil_tar = _tar_with(tmp_path / "evil.tar.gz", {**good, "../evil": b"pwned"})
    with pytest.raises(BundleError, match=r"unsafe archive member '\.\./evil'"):
        B.load_bundle(evil_tar)

    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        for name, data in good.items():
            zf.writestr(name, data)
        zf.writestr("../evil", b"pwned")
    with pytest.raises(BundleError, match="unsafe archive member"):
        B.load_bundle(evil_zip)

    abs_tar = _tar_with(tmp_path / "abs.tar.gz", {**good, "/tmp/evil": b"pwned"})
    with pytest.raises(BundleError, match="absolute path"):
        B.load_bundle(abs_tar)

    link_tar = _tar_with(tmp_path / "link.tar.gz", good, symlink="/etc/passwd")
    with pytest.raises(BundleError, match="not a regular file"):
        B.load_bundle(link_tar)

    assert not (tmp_path / "evil").exists()
    assert not (tmp_path.parent / "evil").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_non_archive_file_is_rejected(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.onnx", b"not an archive")
    with pytest.raises(BundleError, match="not a .tar, .tar.gz or .zip"):
        B.load_bundle(f)


# ---------------------------------------------------------------------------------------------
# default_bundle_path


def test_default_bundle_path_from_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edgestad.toml").write_text('bundle = "from-toml"\n')
    monkeypatch.setenv("EDGESTAD_BUNDLE", str(tmp_path / "from-env"))
    assert B.default_bundle_path() == tmp_path / "from-env"  # env wins over the config file


def test_default_bundle_path_from_toml(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("EDGESTAD_BUNDLE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edgestad.toml").write_text('# line config\nbundle = "runs/bottle/bundle"\n')
    assert B.default_bundle_path() == tmp_path / "runs" / "bottle" / "bundle"

    (tmp_path / "edgestad.toml").write_text('[runtime]\nbundle = "x"\n')
    with pytest.raises(BundleError, match="no top-level 'bundle' key"):
        B.default_bundle_path()
    (tmp_path / "edgestad.toml").write_text('bundle = \n')
    with pytest.raises(BundleError, match="invalid TOML"):
        B.default_bundle_path()


def test_default_bundle_path_unset(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("EDGESTAD_BUNDLE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError) as exc:
        B.default_bundle_path()
    assert "EDGESTAD_BUNDLE" in str(exc.value) and "edgestad.toml" in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Torch-free runtime


def test_bundle_module_does_not_import_torch() -> None:
    code = "import edgestad.bundle, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_safetensors_header_length_starting_with_pickle_byte_is_accepted(bundle_dir: Path) -> None:
    # Regression: a real bundle's header was 0x1080 bytes long, so its first byte was 0x80, the
    # pickle PROTO opcode. Only files that fail to parse as safetensors may be called pickles.
    from safetensors.numpy import save
    weights = {k: np.ascontiguousarray(v) for k, v in _weights(1).items()}
    data = save(weights)
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].rstrip(b" ")
    padded = 0x1080
    assert len(header) < padded
    rebuilt = padded.to_bytes(8, "little") + header + b" " * (padded - len(header)) + data[8 + n:]
    assert rebuilt[:1] == b"\x80"
    B.add_files(bundle_dir, {"weights.safetensors": rebuilt})
    _assert_weights_equal(B.load_bundle(bundle_dir).weights(), weights)
