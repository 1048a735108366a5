"""Which packages the distribution holds, found rather than listed (everything else is in
pyproject.toml).

- ``edgestad/`` and every package under it (a new method folder included);
- the stage folders a newcomer opens at the top (train/, export/, runtime/, bench/), installed as
  ``edgestad.train`` etc. so that no generic top-level name (``train``, ``runtime``) lands in
  site-packages;
- package data: every file that is not Python source inside a method folder (e.g. Uninformed
  Students' shipped teachers) and the runtime's service files and operator page.
"""
from pathlib import Path

from setuptools import find_packages, setup

STAGES = ("train", "export", "runtime", "bench")
ROOT = Path(__file__).parent


def packages() -> list[str]:
    found = find_packages(include=["edgestad", "edgestad.*"])
    for stage in STAGES:
        found += [f"edgestad.{stage}"] + [f"edgestad.{stage}.{p}" for p in find_packages(stage)]
    return found


def method_data() -> dict[str, list[str]]:
    """Package → its non-Python files (paths relative to the package) for each method folder."""
    data = {}
    for package in find_packages(include=["edgestad.methods.*"]):
        folder = ROOT.joinpath(*package.split("."))
        files = [str(f.relative_to(folder)) for f in sorted(folder.rglob("*"))
                 if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts]
        if files:
            data[package] = files
    return data


setup(
    packages=packages(),
    package_dir={f"edgestad.{stage}": stage for stage in STAGES},
    package_data={**method_data(), "edgestad.runtime": ["*.service", "*.toml", "static/*"]},
)
