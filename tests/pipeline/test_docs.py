"""The docs site builds with no network and no broken link, and the README stays a short front page."""

import os
import re
import subprocess
import sys

from tests.helpers import ROOT, network_off

README = ROOT / "README.md"
README_LIMIT = 12_000  # characters: the front page; everything else is in docs/
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # the target of a markdown link or image


def test_the_site_builds_strict_with_the_network_off(tmp_path):
    site = tmp_path / "site"
    # --strict: a broken link or anchor, a page missing from the nav or a missing snippet fails the build.
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    result = subprocess.run(network_off(cmd), cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "reference/params/index.html").is_file()
    # The home page includes the README's quickstart and demo rather than a copy of them.
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "librarian demo" in home and "--8&lt;--" not in home and "--8<--" not in home


def test_the_readme_is_a_front_page():
    assert len(README.read_text(encoding="utf-8")) <= README_LIMIT


def test_every_relative_link_of_the_readme_exists():
    targets = [t for t in LINK.findall(README.read_text(encoding="utf-8"))
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert targets  # the README links into the docs
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert missing == []
