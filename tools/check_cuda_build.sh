#!/usr/bin/env bash
# Builds the CUDA extension (GIVA_BUILD=cuda) from a clean copy of the tree with a CUDA torch and
# checks that giva_ext._C carries sm_80 and sm_90 machine code plus PTX and registers the CUDA
# kernels. Exits non-zero on any failure. No GPU is needed.
#
# The build runs in a temporary copy, so no CUDA _C.so lands in giva_ext/ where a CPU-only torch
# would try to load it.
#
# Environment: GIVA_CUDA_VENV (default .venv-cuda, created with torch==2.14.1 if absent),
# CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS (2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GIVA_CUDA_VENV:-$ROOT/.venv-cuda}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export MAX_JOBS="${MAX_JOBS:-2}"
export GIVA_BUILD=cuda

fail() { echo "check_cuda_build: FAIL: $*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "check_cuda_build: creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install torch==2.14.1 numpy ninja pytest setuptools wheel
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' \
  || fail "torch in $VENV was built without CUDA"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# The tree as CI sees it: tracked and untracked-but-not-ignored files, no build outputs.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf -) | tar -C "$WORK/" -xf -
mkdir -p "$WORK/lib" "$WORK/tmp"

start=$(date +%s)
(cd "$WORK" && "$PY" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp") \
  || fail "build failed"
echo "check_cuda_build: built in $(( $(date +%s) - start )) s (MAX_JOBS=$MAX_JOBS)"

so=$(ls "$WORK"/lib/giva_ext/_C*.so 2>/dev/null | head -n1)
[ -n "$so" ] || fail "no giva_ext/_C*.so in the build output"

cuobjdump=""
for c in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
         "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then cuobjdump="$c"; break; fi
done
[ -n "$cuobjdump" ] || fail "cuobjdump not found (CUDA_HOME/bin, PATH, triton)"

elf=$("$cuobjdump" --list-elf "$so") || fail "cuobjdump --list-elf failed"
ptx=$("$cuobjdump" --list-ptx "$so") || fail "cuobjdump --list-ptx failed"
for arch in sm_80 sm_90; do
  grep -q "$arch" <<<"$elf" || fail "no $arch SASS in $so"
done
grep -q "sm_90\|compute_90" <<<"$ptx" || fail "no compute_90 PTX in $so"
echo "check_cuda_build: SASS: $(grep -o 'sm_[0-9a-z]*' <<<"$elf" | sort -u | tr '\n' ' ')"
echo "check_cuda_build: PTX:  $(grep -o '\(sm\|compute\)_[0-9a-z]*' <<<"$ptx" | sort -u | tr '\n' ' ')"

# The library loads into this torch and registers a CUDA kernel for every op it defines.
"$PY" - "$so" <<'PYEOF' || fail "the built library does not load or lacks CUDA kernels"
import sys
import torch
torch.ops.load_library(sys.argv[1])
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("giva::")]
assert len(ops) >= 4, f"too few giva ops registered: {ops}"
for op in ops:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op}: no CUDA kernel"
PYEOF
echo "check_cuda_build: OK"
