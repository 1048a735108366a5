"""The method choice at the command line, and the package boundaries the interface keeps."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edgestad.cli import main
from edgestad.methods import DEFAULT_METHOD, list_methods, method_names

ROOT = Path(__file__).resolve().parents[2]


def test_methods_command_lists_every_method_with_its_paper_and_backbone():
    r = CliRunner().invoke(main, ["methods"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == len(method_names())
    for method, line in zip(list_methods(), lines):
        assert line.startswith(method.name)
        assert method.paper in line and method.default_backbone in line
    assert f"{DEFAULT_METHOD} (default)" in r.output


def test_unknown_method_and_foreign_options_are_usage_errors(tiny_dataset, tmp_path):
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "b"),
                                  "--method", "nope"])
    assert r.exit_code == 2 and "--method" in r.output and "stfpm" in r.output
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "b"),
                                  "--method", "stfpm", "--dense-stride", "2"])
    assert r.exit_code == 2 and "--dense-stride" in r.output and "uninformed_students" in r.output
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "b"),
                                  "--image-score", "median"])
    assert r.exit_code == 2 and "image score rule" in r.output
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "b"),
                                  "--backbone", "vgg16"])
    assert r.exit_code != 0 and "vgg16" in r.output


def test_finished_bundle_is_not_replaced_without_force(tiny_dataset, tmp_path):
    bundle = tmp_path / "b"
    args = ["train", str(tiny_dataset), "--out", str(bundle), "--input-size", "64", "--epochs", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    before = (bundle / "manifest.json").read_bytes()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--force" in r.output
    assert (bundle / "manifest.json").read_bytes() == before
    assert "stfpm" in r.output or "--out" in r.output


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module if node.level == 0 else "." * node.level + node.module)
    return names


def test_core_package_does_not_import_export_runtime_or_bench():
    """Only the CLI entry points that orchestrate stages (cli, demo) may reach into them."""
    allowed = {"cli.py", "demo.py"}
    offenders = []
    for path in (ROOT / "edgestad").rglob("*.py"):
        if path.name in allowed and path.parent == ROOT / "edgestad":
            continue
        for name in _imports(path):
            if name.startswith(("edgestad.export", "edgestad.runtime", "edgestad.bench")):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


def test_graph_contract_module_is_torch_free():
    code = ("import sys; import edgestad.contract, edgestad.onnx_session;"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_runtime_and_bench_take_the_contract_names_from_one_module():
    from edgestad import contract
    from edgestad.export import graph
    from edgestad.runtime import backends
    from edgestad.bench import cli as bench
    for name in ("INPUT_NAME", "MAP_NAME", "SCORE_NAME"):
        assert getattr(graph, name) is getattr(contract, name)
        assert getattr(backends, name) is getattr(contract, name)
    assert bench.INPUT_NAME is contract.INPUT_NAME and bench.OUTPUT_NAMES is contract.OUTPUT_NAMES


def test_method_settings_and_options_without_their_own_flag(tiny_dataset, tmp_path):
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "b"),
                                  "-o", "no_such_thing=1"])
    assert r.exit_code == 2 and "no_such_thing" in r.output and "settings:" in r.output
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "b"),
                                  "-o", "levels"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    out = tmp_path / "levels"
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(out), "--input-size", "64",
                                  "--epochs", "1", "-o", "levels=[8,16]", "-o", "momentum=0.8"])
    assert r.exit_code == 0, r.output
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method_config"]["levels"] == [8, 16]
    assert manifest["provenance"]["training"]["options"]["momentum"] == 0.8


def test_resume_refuses_other_settings_and_foreign_options(tiny_dataset, tmp_path):
    out = tmp_path / "b"
    partial = tmp_path / ".b.partial"
    partial.mkdir()
    (partial / "checkpoint.pt").write_bytes(b"not read: settings are compared first")
    import json
    (partial / "settings.json").write_text(json.dumps(
        {"data": str(tiny_dataset), "method": "stfpm",
         "settings": {"batch_size": 16, "lr": 0.4, "seed": 0, "val_fraction": 0.1}}))
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(out), "--lr", "0.1"])
    assert r.exit_code == 2 and "--lr" in r.output and "0.4" in r.output
    r = CliRunner().invoke(main, ["train", str(tiny_dataset / "train" / "good"), "--out", str(out)])
    assert r.exit_code == 2 and "DATA" in r.output
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "c"),
                                  "--method", "uninformed_students", "--backbone-weights",
                                  str(partial / "checkpoint.pt")])
    assert r.exit_code == 2 and "--backbone-weights" in r.output
