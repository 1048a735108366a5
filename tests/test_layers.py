"""Layers that hold. The core package (edgestad/, the methods included) imports none of the stages
(edgestad.train, edgestad.export, edgestad.runtime, edgestad.bench): what the methods need to
train (the staged loop, checkpoints) lives in the core. Only the CLI entry points that
orchestrate stages (edgestad/cli.py, edgestad/demo.py) reach into them. The numpy-only Perlin
generator and the method declarations import no torch (`edgestad methods` and `train --help`
stay fast and torch-free). The runtime's own boundary (no torch at all) is
test_runtime_no_torch.py."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "edgestad"
STAGES = ("edgestad.train", "edgestad.export", "edgestad.runtime", "edgestad.bench")
ORCHESTRATORS = {CORE / "cli.py", CORE / "demo.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names (at any depth, inside functions too),
    relative imports resolved against the file's package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_import_scan_resolves_relative_imports():
    """The scan below would see `from ...train import fit` in a method folder."""
    folder = ROOT / "edgestad" / "methods" / "stfpm"
    names = imported_modules(folder / "method.py")
    assert "edgestad.methods.common.training" in names          # `from ..common.training import`
    assert "edgestad.methods.stfpm.STFPMConfig" in names          # `from . import STFPMConfig`


def test_the_core_imports_no_stage():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        if path in ORCHESTRATORS:
            continue
        for name in imported_modules(path):
            if name.startswith(STAGES):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


def test_perlin_and_the_method_declarations_import_no_torch_and_no_stage():
    code = """if True:
        import sys

        class Forbid:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith(("torch.", "edgestad.train")):
                    raise ImportError(f"{name} must not be imported here")
                return None

        sys.meta_path.insert(0, Forbid())
        import edgestad.methods.common.perlin
        from edgestad.methods import list_methods
        from edgestad.methods.catalog import methods_text
        methods = list_methods()
        assert methods and methods_text()
        for m in methods:
            m.make_config()           # configs and their checks are torch-free too
            m.resolve_options({})
        print("ok")
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_runtime_reads_single_images_and_never_loads_datasets():
    """edgestad/images.py (decode, resize, letterbox, ROI) is what the runtime shares with training;
    edgestad/datasets.py (data root, MVTec categories, splits, loading many) is training's and
    evaluation's alone."""
    runtime = sorted((ROOT / "runtime").rglob("*.py"))
    names = {path.name: imported_modules(path) for path in runtime}
    assert any(n.startswith("edgestad.images") for used in names.values() for n in used)
    offenders = [f"runtime/{file}: {n}" for file, used in names.items() for n in used
                 if n.startswith("edgestad.datasets")]
    assert not offenders, offenders
