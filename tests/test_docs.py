"""The docs hold together: every relative link in README.md and docs/*.md points at a file that
exists in the repository, and every file the docs name under bench/results/ is there."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
RESULT = re.compile(r"`?(bench/results/[\w./-]+\.(?:json|md|png))`?")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = doc.read_text()
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_results_exist(doc):
    for name in RESULT.findall(doc.read_text()):
        if "*" in name:
            continue
        assert (ROOT / name).exists(), f"{doc.name} names {name}, which is not stored"
