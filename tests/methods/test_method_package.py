"""A method in a package of its own (tests/method_package, README "Adding a method"): installed
with pip next to edgestad, it is listed by `edgestad methods`, trains through the shared loop and
exports, with nothing in edgestad changed. Run in fresh interpreters whose only link to the
package is PYTHONPATH (its entry point), offline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

PACKAGE = Path(__file__).resolve().parents[1] / "method_package"
EDGESTAD = [sys.executable, "-c", "from edgestad.cli import main; main()"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package installed (built offline from a copy, so the tree stays clean) into a folder."""
    root = tmp_path_factory.mktemp("method_package")
    source = shutil.copytree(PACKAGE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                                 "__pycache__"))
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert (target / "tiny_method" / "model.py").is_file()
    return target


def edgestad(args, site: Path | None, cwd: Path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run(EDGESTAD + [str(a) for a in args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_methods_lists_the_installed_package_and_only_then(installed, tmp_path):
    without = edgestad(["methods"], None, tmp_path)
    assert without.returncode == 0, without.stderr
    assert "tiny_distill" not in without.stdout
    listed = edgestad(["methods"], installed, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "tiny_distill: Tiny distillation" in listed.stdout
    assert "momentum (float, default 0.9; -o momentum=VALUE): SGD momentum" in listed.stdout
    assert "channels=8" in listed.stdout                       # its settings, from its config
    assert listed.stdout.index("stfpm (default)") < listed.stdout.index("tiny_distill")


def test_the_package_method_trains_through_the_shared_loop_and_exports(installed, tiny_dataset, tmp_path):
    bundle = tmp_path / "bundle"
    r = edgestad(["train", tiny_dataset, "--out", bundle, "--method", "tiny_distill", "--epochs", "2",
                  "-o", "momentum=0.5", "-o", "channels=4", "--device", "cpu"], installed, tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["method"] == "tiny_distill" and manifest["method_config"]["channels"] == 4
    history = manifest["provenance"]["training"]["history"]
    assert [(h["epoch"], h["stage"]) for h in history] == [(1, "student"), (2, "student")]
    assert manifest["provenance"]["training"]["options"] == {"momentum": 0.5}
    r = edgestad(["export", bundle, "--precision", "fp32", "--parity-images", "2"], installed, tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert (bundle / "model.onnx").is_file()
    report = json.loads((bundle / "export_report.json").read_text())
    assert report["graphs"]["fp32"]["parity"]["vs_torch"]["max_rel_diff_map"] <= 1e-4
    r = edgestad(["train", tiny_dataset, "--out", tmp_path / "other", "--method", "tiny_distill",
                  "-o", "momentum=-1"], installed, tmp_path)
    assert r.returncode == 2 and "momentum: must be at least 0" in r.stderr
