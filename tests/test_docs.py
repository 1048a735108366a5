"""The documentation cannot break silently: the MkDocs site builds in strict mode (a broken link,
anchor or image, or a page left out of the nav, fails it), and every relative link of README.md
(which lies outside docs/) points at a file that exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_links() -> list[str]:
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))   # code is not a link
    return [m.group(1).split("#")[0] for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)]


def test_readme_links_resolve():
    links = [t for t in readme_links() if t and not re.match(r"^[a-z]+:", t)]
    assert len(links) > 10                      # the README points into docs/
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, missing


def test_mkdocs_strict_build(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is not installed: the dev extra has it (bash scripts/setup_venv.sh)"
    r = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").is_file()
