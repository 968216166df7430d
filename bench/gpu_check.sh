#!/usr/bin/env bash
# One-shot check of the CUDA build on a GPU machine with torch (CUDA) and nvcc preinstalled and no
# network: build, CUDA op tests, compute-sanitizer on a tiny forward+backward, the layer overhead
# benchmark at T=8192, in=out=4096 (GPU times; bf16 r=8 and r=64 with a per-kernel profile, fp16
# r=8), GiVA and LoRA on quantized MiniLM bases, and the benchmark suite (bench/, default size) with
# its report. Every step has a timeout,
# the whole run stays under GIVA_CHECK_BUDGET_S (default 470 s), and a failing step does not stop
# the next. Run from the repository root:
#
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Writes into $OUT (15 files): env_build.log pytest.log pytest.xml sanitizer.log bench.log
# bench_bf16.json bench_fp16.json mixed_bf16.json mixed_decode_bf16.json quantized_gpu.json suite.log
# suite_gpu.json suite_gpu.md suite_gpu.png summary.json
# (exit code and seconds of every step).
set -uo pipefail

OUT="${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + ${GIVA_CHECK_BUDGET_S:-470}))
STEPS="$(mktemp)"
export GIVA_BUILD=cuda TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

# step NAME CAP_S LOG CMD...: runs CMD under timeout min(CAP_S, time left), appending to LOG.
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$((DEADLINE - $(date +%s) - 5)) t0 rc
  local limit=$((cap < left ? cap : left))
  t0=$(date +%s)
  if [ "$limit" -lt 10 ]; then
    rc=124
    echo "== $name: skipped, out of time" | tee -a "$log"
  else
    echo "== $name (timeout ${limit}s): $*" >>"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
  fi
  echo "$name $rc $(( $(date +%s) - t0 ))" >>"$STEPS"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
  return 0
}

ENV_LOG="$OUT/env_build.log"
step nvidia_smi 20 "$ENV_LOG" nvidia-smi
step versions 60 "$ENV_LOG" "$PY" -c \
  'import sys, setuptools, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0)); print("setuptools", setuptools.__version__, "(the build needs >= 77)")'
# pip's editable install first; build_ext --inplace if pip cannot (e.g. a missing build backend).
build() {
  "$PY" -m pip install --no-build-isolation --no-deps -e . || "$PY" setup.py build_ext --inplace
}
step build 240 "$ENV_LOG" build
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
tail -n 30 "$ENV_LOG"

step pytest 180 "$OUT/pytest.log" "$PY" -m pytest tests/test_ops_cuda.py tests/test_sketch_cuda.py \
  tests/test_adapters_cuda.py tests/test_ops.py tests/test_adapter_op.py tests/test_quantized.py -q \
  -p no:cacheprovider --junitxml="$OUT/pytest.xml"
tail -n 25 "$OUT/pytest.log"

# Every kernel and path once, on small odd shapes: fused (r <= 8) and cuBLAS (r > 8) ranks,
# aligned and element-wise loads, all output masks, edge sizes (T = 0, r = 1, out = 1, an odd in,
# a strided x), the sketch ops, and mixed_linear (at these sizes its per-row kernels).
TINY="$(mktemp --suffix=.py)"
cat >"$TINY" <<'PYEOF'
import itertools
import torch
import giva_ext.ops  # loads the op library
torch.manual_seed(0)
for dtype, (T, n_in, n_out, r) in itertools.product(
        (torch.float32, torch.bfloat16), ((37, 64, 48, 8), (9, 23, 29, 3), (16, 40, 24, 12))):
    t = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)
    x, w, b, A, B, ls, lo = t(T, n_in), t(n_out, n_in), t(n_out), t(r, n_in), t(n_out, r), t(r), t(n_out)
    y, s = torch.ops.giva.linear_forward(x, w, b, A, B, ls, lo)
    for mask in itertools.product((False, True), repeat=3):
        torch.ops.giva.linear_backward(t(T, n_out), s, w, A, B, ls, lo, list(mask))
        torch.ops.giva.adapter_backward(t(T, n_out), s, A, B, ls, lo, list(mask))
    torch.ops.giva.adapter_forward(x, t(T, n_out), A, B, ls, lo)
    torch.ops.giva.adapter_forward(x, t(T, n_out + 1)[:, 1:], A, B, ls, lo)  # unaligned base rows
    if dtype != torch.float32:  # the vectors in float32, as a half-precision model keeps them
        torch.ops.giva.linear_forward(x, w, b, A, B, ls.float(), lo.float())
        torch.ops.giva.linear_backward(t(T, n_out), s, w, A, B, ls.float(), lo.float(), [True] * 3)
    ids = torch.randint(-1, 2, (T,), device="cuda")
    for token_ids in (ids, ids.sort().values):
        torch.ops.giva.mixed_linear(x, w, b, [A, A[:1]], [B, B[:, :1]], [ls, ls[:1]], [lo, lo], token_ids)
for dtype, (T, n_in, n_out, r) in itertools.product(
        (torch.float32, torch.float16), ((0, 16, 8, 2), (5, 13, 1, 1), (7, 33, 20, 1))):
    t = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)
    x = t(n_in, T).t()  # strided
    w, b, A, B, ls, lo = t(n_out, n_in), t(n_out), t(r, n_in), t(n_out, r), t(r), t(n_out)
    y, s = torch.ops.giva.linear_forward(x, w, b, A, B, ls, lo)
    torch.ops.giva.linear_backward(t(T, n_out), s, w, A, B, ls, lo, [True, True, True])
    f32 = lambda *s: torch.randn(*s, device="cuda")
    torch.ops.giva.sketch_update(x, t(T, n_out), f32(n_in, 3), f32(5, n_out), f32(n_out, 3), f32(5, n_in))
torch.ops.giva.rsvd(torch.randn(40, 30, device="cuda"), torch.randn(30, 6, device="cuda"), 4, 2)
torch.cuda.synchronize()
print("tiny forward+backward done")
PYEOF
SANITIZER="$(command -v compute-sanitizer || true)"
for c in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
  [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER="$c"
done
if [ -n "$SANITIZER" ]; then
  step memcheck 90 "$OUT/sanitizer.log" "$SANITIZER" --tool memcheck --error-exitcode 3 "$PY" "$TINY"
  step racecheck 90 "$OUT/sanitizer.log" "$SANITIZER" --tool racecheck --error-exitcode 3 "$PY" "$TINY"
else
  echo "compute-sanitizer not found" | tee -a "$OUT/sanitizer.log"
  echo "memcheck 127 0" >>"$STEPS"
fi
tail -n 15 "$OUT/sanitizer.log"

step bench_bf16 90 "$OUT/bench.log" "$PY" bench/layer_overhead.py --device cuda --dtype bfloat16 \
  --shapes 8192x4096x4096 --ranks 8 64 --json "$OUT/bench_bf16.json" \
  --profile "nn.Linear (floor)" "GiVA native" "PEFT VeRA"
step bench_fp16 60 "$OUT/bench.log" "$PY" bench/layer_overhead.py --device cuda --dtype float16 \
  --shapes 8192x4096x4096 --ranks 8 --json "$OUT/bench_fp16.json"
tail -n 30 "$OUT/bench.log"

step mixed_bf16 40 "$OUT/bench.log" "$PY" bench/mixed_adapters.py --device cuda --dtype bfloat16 \
  --dims 4096 --json "$OUT/mixed_bf16.json"
# Decoding: one token per sequence, the per-row (graph-capturable) path of the mixed op.
step mixed_decode_bf16 30 "$OUT/bench.log" "$PY" bench/mixed_adapters.py --device cuda \
  --dtype bfloat16 --dims 4096 --seq-len 1 --json "$OUT/mixed_decode_bf16.json"
tail -n 10 "$OUT/bench.log"

# GiVA r=8 against PEFT LoRA r=8 on quantized MiniLM bases (bitsandbytes NF4 and int8, torchao int8).
step quantized 45 "$OUT/bench.log" "$PY" bench/quantized.py --device cuda --bases fp32,nf4,int8,torchao-int8 \
  --batch 32x128 --steps 0 --json "$OUT/quantized_gpu.json"
tail -n 16 "$OUT/bench.log"

# The pytest-benchmark suite, default size on the GPU (layers in bf16 and fp16, the MiniLM step and
# init in bf16/fp32, memory), then its report. Peers whose package is missing here skip.
step suite 150 "$OUT/suite.log" "$PY" -m pytest bench/ -q -p no:cacheprovider --bench-size default \
  --bench-device cuda --benchmark-columns=median,rounds --benchmark-json "$OUT/suite_gpu.json"
step report 30 "$OUT/suite.log" "$PY" bench/report.py "$OUT/suite_gpu.json"
tail -n 60 "$OUT/suite.log"

"$PY" - "$STEPS" "$OUT/summary.json" "$START" <<'PYEOF'
import json, sys, time
steps = {}
for line in open(sys.argv[1]):
    name, rc, secs = line.split()
    steps[name] = {"exit": int(rc), "seconds": int(secs)}
summary = {"ok": all(s["exit"] == 0 for s in steps.values()),
           "total_seconds": int(time.time()) - int(sys.argv[3]), "steps": steps}
json.dump(summary, open(sys.argv[2], "w"), indent=1)
print(f"{'step':<12} {'exit':>4} {'s':>5}")
for name, s in steps.items():
    print(f"{name:<12} {s['exit']:>4} {s['seconds']:>5}")
print("ok" if summary["ok"] else "FAILED", f"in {summary['total_seconds']} s")
PYEOF
rm -f "$STEPS" "$TINY"
