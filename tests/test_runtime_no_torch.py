"""The runtime must never import torch (it installs on a Jetson without it): proven in a fresh
interpreter that imports every runtime module and runs a real pipeline end to end, with an import
hook recording any attempt to import torch, even one caught by a try/except."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from test_runtime_toy import make_toy_bundle, write_video

CHILD = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    attempts = []

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                attempts.append(name)
                raise ImportError("torch is forbidden in the runtime")
            return None

    sys.meta_path.insert(0, NoTorch())
    import edgestad.runtime as rt
    modules = sorted(m.name for m in pkgutil.walk_packages(rt.__path__, "edgestad.runtime."))
    for name in modules:
        importlib.import_module(name)
    from edgestad.runtime.cli import main
    try:
        main(["run", sys.argv[1], "--video", sys.argv[2], "--events", sys.argv[3]], standalone_mode=False)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    print(json.dumps({"modules": modules, "attempts": attempts,
                      "torch_loaded": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
    """
)


def test_runtime_imports_and_runs_without_torch(tmp_path):
    bundle = make_toy_bundle(tmp_path / "bundle", 32, 32)
    video = write_video(tmp_path / "v.avi", 12)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(video), str(tmp_path / "ev")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"edgestad.runtime." + m for m in (
        "backends", "cli", "config", "errors", "http", "notify", "pipeline", "preprocess", "results",
        "service", "sinks", "sources")}
    assert expected <= set(report["modules"])
    assert report["attempts"] == [] and report["torch_loaded"] == []
    assert (tmp_path / "ev" / "events.jsonl").is_file()
