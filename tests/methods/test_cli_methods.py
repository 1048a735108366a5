"""The method choice at the command line, and the package boundaries the interface keeps."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgestad.cli import main
from edgestad.methods import DEFAULT_METHOD, list_methods, method_names


def test_methods_command_and_train_help_are_generated_from_the_declarations():
    r = CliRunner().invoke(main, ["methods"])
    assert r.exit_code == 0, r.output
    blocks = []
    for line in r.output.rstrip().splitlines():
        if line.startswith(" "):
            blocks[-1].append(line)
        else:
            blocks.append([line])
    assert [b[0].split(":")[0].replace(" (default)", "") for b in blocks] == method_names()
    for method, block in zip(list_methods(), blocks):
        text = "\n".join(block)
        assert method.paper in text and method.default_backbone in text
        assert f"epochs {method.defaults['epochs']}" in text
        for setting in method.setting_names():
            assert f"{setting}=" in text
        for option in method.options:
            assert f"{option.name} ({option.type_name}, default " in text
    assert f"{DEFAULT_METHOD} (default)" in r.output
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0, r.output
    section = r.output.split("Methods (--method)")[1]
    for method in list_methods():
        assert f"{method.name}" in section and method.paper in section
        for option in method.options:
            assert f"{option.name} ({option.type_name}, default " in section
        for preset in method.presets:
            assert f"--preset {preset}" in section


def test_methods_and_train_help_import_no_torch():
    code = ("import sys; from click.testing import CliRunner; from edgestad.cli import main;"
            "r = CliRunner().invoke(main, ['methods']); assert r.exit_code == 0, r.output;"
            "r = CliRunner().invoke(main, ['train', '--help']); assert r.exit_code == 0, r.output;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("args, expected", [
    (["-o", "momentum=fast"], ("momentum", "a number")),
    (["--method", "rstpm", "-o", "disc_epochs=-1"], ("disc_epochs", "at least 0")),
    (["--method", "stfpm_ae", "-o", "ae_pretrain_epochs=1.5"], ("ae_pretrain_epochs", "integer")),
    (["-p", "17", "--input-size", "64", "--crop-size", "80"], ("--crop-size", "larger")),
    (["--preset", "fast"], ("--preset", "no presets")),
])
def test_options_are_typed_and_checked_before_any_image_is_read(args, expected, tmp_path):
    data = tmp_path / "empty"          # never read: the error comes first
    data.mkdir()
    r = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "b"), *args])
    assert r.exit_code == 2 and all(e in r.output for e in expected), r.output


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


def test_graph_contract_module_is_torch_free():
    code = ("import sys; import edgestad.contract, edgestad.runner;"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_runtime_and_bench_take_the_contract_names_from_one_module():
    from edgestad import contract
    from edgestad.export import graph
    from edgestad.runtime import backends
    from edgestad.bench import graphs as bench
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
