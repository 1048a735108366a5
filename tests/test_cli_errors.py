"""One line per user error, everywhere: each case drives the real CLI and checks the exit code and
that stderr is exactly one `error: ...` line naming the file or option. Also: `train` never
destroys a finished bundle, says where it resumes from, and says how to resume when interrupted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgestad.cli import main

from test_runtime_toy import make_toy_bundle, write_folder

NOT_UTF8 = b'folder = "frames"\n# caf\xe9 \xff\n'


def one_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _good_folder(path: Path, n: int = 6) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(path / f"good_{i}.png"), rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    return path


def _train(data: Path, out: Path, *extra):
    return CliRunner().invoke(main, ["train", str(data), "--out", str(out), "--input-size", "64",
                                     "--epochs", "1", "--device", "cpu", *extra])


# ------------------------------------------------------------------------------ train on bad data


@pytest.mark.parametrize("kind", ["truncated", "empty", "undecodable"])
def test_train_on_a_damaged_image_is_one_line_naming_the_file(tmp_path, kind):
    pytest.importorskip("torch")
    data = _good_folder(tmp_path / "data")
    bad = data / "zz_bad.png"
    png = (data / "good_0.png").read_bytes()
    bad.write_bytes({"truncated": png[: len(png) // 2], "empty": b"",
                     "undecodable": b"this is not an image at all\n" * 10}[kind])
    line = one_line(_train(data, tmp_path / "bundle"))
    assert "zz_bad.png" in line
    assert not (tmp_path / "bundle").exists()


def test_train_on_an_empty_folder(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "empty").mkdir()
    line = one_line(_train(tmp_path / "empty", tmp_path / "bundle"))
    assert str(tmp_path / "empty") in line and "no images" in line


@pytest.mark.parametrize("args, option", [
    (["--epochs", "0"], "--epochs"),
    (["--students", "0"], "--students"),
    (["--crop-size", "500", "--input-size", "64"], "--crop-size"),
])
def test_train_option_errors_are_usage_errors_on_one_line(tmp_path, args, option):
    data = _good_folder(tmp_path / "data")
    r = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "b"), *args])
    assert one_line(r).startswith(f"error: {option}: ")


# ------------------------------------------------------------------------------ damaged bundles


@pytest.mark.parametrize("damage", ["modified weights", "deleted manifest"])
def test_evaluate_on_a_damaged_bundle(tmp_path, tiny_dataset, damage):
    bundle = make_toy_bundle(tmp_path / "bundle")
    if damage == "modified weights":
        weights = bundle / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (bundle / "manifest.json").unlink()
    line = one_line(CliRunner().invoke(main, ["evaluate", str(bundle), str(tiny_dataset), "--out",
                                              str(tmp_path / "eval")]))
    assert str(bundle) in line
    assert ("weights.safetensors" in line and "sha256 mismatch" in line) if damage == "modified weights" \
        else ("manifest.json is missing" in line)


def test_debug_shows_the_traceback(tmp_path, tiny_dataset, monkeypatch):
    bundle = make_toy_bundle(tmp_path / "bundle")
    (bundle / "manifest.json").unlink()
    r = CliRunner().invoke(main, ["--debug", "evaluate", str(bundle), str(tiny_dataset)])
    assert r.exit_code == 1 and type(r.exception).__name__ == "BundleError"
    monkeypatch.setenv("EDGESTAD_DEBUG", "1")
    r = CliRunner().invoke(main, ["evaluate", str(bundle), str(tiny_dataset)])
    assert type(r.exception).__name__ == "BundleError"


def test_an_unexpected_failure_is_one_line_with_exit_1(tmp_path, monkeypatch):
    from edgestad import trust_cli

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("edgestad.signing.keygen", boom)
    line = one_line(CliRunner().invoke(main, ["keygen", "--out", str(tmp_path)]), 1)
    assert "ZeroDivisionError" in line and "--debug" in line
    assert trust_cli  # imported: the command module is the one patched


def test_bare_command_still_shows_the_help():
    r = CliRunner().invoke(main, [])
    assert "Commands:" in r.output and "thresholds" in r.output and "error:" not in r.output


# ------------------------------------------------------------------------------ config files


def test_run_with_a_config_file_that_is_not_utf8(tmp_path):
    config = tmp_path / "edgestad.toml"
    config.write_bytes(NOT_UTF8)
    line = one_line(CliRunner().invoke(main, ["run", "--config", str(config)]))
    assert str(config) in line and "not UTF-8" in line


def test_config_checker_with_a_file_that_is_not_utf8(tmp_path):
    config = tmp_path / "edgestad.toml"
    config.write_bytes(NOT_UTF8)
    p = subprocess.run([sys.executable, "-m", "edgestad.runtime.config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: not UTF-8")


def test_export_with_an_edgestad_toml_that_is_not_utf8(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGESTAD_BUNDLE", raising=False)
    (tmp_path / "edgestad.toml").write_bytes(NOT_UTF8)
    line = one_line(CliRunner().invoke(main, ["export", "-p", "fp32"]))
    assert "edgestad.toml" in line and "not UTF-8" in line


def test_runtime_entry_point_keeps_its_exit_codes_with_one_line(tmp_path):
    """`python -m edgestad.runtime.cli run` (what the service runs): 4 for a damaged bundle."""
    bundle = make_toy_bundle(tmp_path / "bundle")
    (bundle / "weights.safetensors").write_bytes(b"x")
    folder = write_folder(tmp_path / "frames", 1)
    p = subprocess.run([sys.executable, "-m", "edgestad.runtime.cli", "run", str(bundle), "--folder",
                        str(folder)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 4, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "weights.safetensors" in errors[0]
    p = subprocess.run([sys.executable, "-m", "edgestad.runtime.cli", "run", "--bogus"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("error: --bogus: no such option")


# ------------------------------------------------------------------------------ train keeps bundles


def test_train_refuses_to_replace_a_finished_bundle(tmp_path, tiny_dataset):
    bundle = make_toy_bundle(tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    line = one_line(_train(tiny_dataset, bundle))
    assert line.startswith("error: --out: ") and "--force" in line
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


def test_interrupted_training_says_how_to_resume_and_resumes_from_the_epoch(tmp_path, tiny_dataset,
                                                                            tiny_teachers, monkeypatch):
    """Uninformed Students (its fit does not announce a resume itself): Ctrl-C after the first
    epoch was checkpointed, then the same command with --epochs 2."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from edgestad.train import fit

    out = tmp_path / "bundle"
    args = ["train", str(tiny_dataset), "--out", str(out), "-p", "17", "--teacher", str(tiny_teachers[17]),
            "--input-size", "64", "--students", "2", "--crop-size", "32", "--device", "cpu"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "write_bundle", interrupted)
    r = CliRunner().invoke(main, args + ["--epochs", "1"])
    assert r.exit_code == 130, r.output
    assert "run the same command again" in r.stderr and ".bundle.partial" in r.stderr
    assert not out.exists() and (tmp_path / ".bundle.partial" / "checkpoint.pt").is_file()

    monkeypatch.undo()
    r = CliRunner().invoke(main, args + ["--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert "resuming from epoch 1 of 2" in r.output  # one epoch done, the second to go
    manifest = json.loads((out / "manifest.json").read_text())
    assert [h["epoch"] for h in manifest["provenance"]["training"]["history"]] == [1, 2]
    assert not (tmp_path / ".bundle.partial").exists()
    # the stored validation statistics reproduce the trained thresholds without retraining
    from edgestad.thresholds import image_threshold_for_false_reject, pixel_threshold_for_fpr
    thr = manifest["thresholds"]
    assert pixel_threshold_for_fpr(thr, thr["rule"]["pixel_fpr"])[0] == thr["pixel"]
    assert image_threshold_for_false_reject(thr, thr["rule"]["image_false_reject"])[0] == \
        pytest.approx(thr["image"], rel=1e-12)
