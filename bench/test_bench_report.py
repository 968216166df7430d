"""bench/report.py on a small hand-made JSON, with timings and without (a --benchmark-disable run):
the ratios it prints and the plot it writes."""
import json

import report

MACHINE = {"giva": {"cpu": "Test CPU", "cpu_count": 2, "threads": 2, "device": "cpu", "gpu": None,
                    "cuda": None, "size": "quick", "other_cores": 0.05, "load_at_start": [0.1, 0.2, 0.3],
                    "load_at_end": [0.4, 0.5, 0.6], "torch": "2.x", "giva_ext": "0.1.0",
                    "native_ops": True, "peft": "0.x", "transformers": "5.x"}}
LABELS = {"frozen": "nn.Linear (floor)", "giva-native": "GiVA native", "peft-lora": "PEFT LoRA"}


def layer_row(peer, r, T, median, floor_median=None):
    info = {"bench": "layer", "mode": "forward+backward", "peer": peer, "label": LABELS[peer],
            "impl": "x 1", "n_in": 1024, "n_out": 1024, "T": T, "r": r, "dtype": "float32"}
    if floor_median is not None:  # the floor timed in alternation with this peer
        info["floor_median_s"] = floor_median
    return info, median


def rows():
    timed = [layer_row("frozen", r, T, 0.010 * T / 2048) for r, T in ((8, 2048), (64, 2048), (8, 512))]
    timed += [layer_row("giva-native", 8, 2048, 0.011, 0.0100), layer_row("giva-native", 64, 2048, 0.012),
              layer_row("giva-native", 8, 512, 0.003), layer_row("peft-lora", 8, 2048, 0.013, 0.0125)]
    timed += [({"bench": "train", "method": m, "label": m, "r": 8, "impl": "x", "batch": [2, 16],
                "dtype": "float32", "trainable": n}, t)
              for m, n, t in (("frozen", 0, 0.1), ("giva", 21024, 0.11), ("peft-lora", 331776, 0.12))]
    untimed = [{"bench": "memory-layer", "peer": "giva-native", "label": "GiVA native", "n_in": 1024,
                "n_out": 1024, "T": 2048, "r": 8, "dtype": "float32", "saved_bytes": 65536,
                "peak_bytes": 3 * 2**20, "peak_method": "test"},
               {"bench": "file", "method": "giva", "label": "GiVA r=8", "r": 8, "trainable": 21024,
                "weights_bytes": 1100, "total_bytes": 1200},
               {"bench": "file", "method": "peft-lora", "label": "PEFT LoRA r=8", "r": 8,
                "trainable": 331776, "weights_bytes": 1000, "total_bytes": 1100}]
    return timed, untimed


def write(path, with_timings):
    timed, untimed = rows()
    benchmarks = [{"group": "g", "name": "n", "extra_info": info,
                   "stats": {"median": t, "rounds": 5} if with_timings else None} for info, t in timed]
    benchmarks += [{"group": "g", "name": "n", "extra_info": info, "stats": None} for info in untimed]
    path.write_text(json.dumps({"machine_info": MACHINE, "benchmarks": benchmarks, "version": "5"}))


def test_report_with_timings(tmp_path, capsys):
    write(tmp_path / "r.json", with_timings=True)
    assert report.main([str(tmp_path / "r.json")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert text == capsys.readouterr().out
    # r=8: GiVA 11 ms over its paired floor of 10 ms, LoRA 13 over 12.5: 1.100, 1.040, 1.100 / 1.040
    assert "| float32 | 1024×1024 | 2048 | 8 | 10.00 | 1.100 | 1.040 | 1.058 |" in text
    # r=64: no paired floor, so the floor's own 10 ms; no LoRA row
    assert "| float32 | 1024×1024 | 2048 | 64 | 10.00 | 1.200 | – | – |" in text
    assert "| giva | 21,024 | 110.00 | 1.100 | 0.917 | – | – |" in text
    assert "| GiVA native |" in text and "0.06 / 3.00" in text
    assert "| GiVA r=8 | 21,024 | 1,100 | 1,200 | 1.100 |" in text
    assert "Timings absent" not in text and "Shared machine" not in text and "r.png" in text
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_timings(tmp_path):
    write(tmp_path / "r.json", with_timings=False)
    assert report.main([str(tmp_path / "r.json"), "--markdown", str(tmp_path / "out.md")]) == 0
    text = (tmp_path / "out.md").read_text()
    assert "Timings absent" in text and "No plot" in text
    assert "## Layer forward+backward" not in text
    assert "| giva | 21,024 | – | – | – |" in text  # trainable parameters are still reported
    assert "0.06 / 3.00" in text and "| PEFT LoRA r=8 | 331,776 | 1,000 | 1,100 | 1.000 |" in text
    assert not (tmp_path / "r.png").exists()


def test_report_flags_a_shared_machine(tmp_path):
    write(tmp_path / "r.json", with_timings=True)
    data = json.loads((tmp_path / "r.json").read_text())
    data["machine_info"]["giva"]["other_cores"] = 1.5  # another job on 1.5 cores during the run
    (tmp_path / "r.json").write_text(json.dumps(data))
    report.main([str(tmp_path / "r.json")])
    text = (tmp_path / "r.md").read_text()
    assert "Other processes kept 1.50 cores busy" in text and "Shared machine" in text
