#!/usr/bin/env bash
# Builds the CPU ops with AddressSanitizer and UndefinedBehaviorSanitizer in a temporary copy of the
# tree and runs the native-op tests (and the CPU emulation of the CUDA kernels) against that build, with libasan preloaded into Python (which
# is not instrumented itself). The normal in-place build, giva_ext/_C*.so, is not touched. Exits
# non-zero on any sanitizer report or failing test.
#
#   bash tools/asan_check.sh                              # every test file that calls the native ops
#   bash tools/asan_check.sh tests/test_ops.py -k opcheck  # other pytest arguments
#
# Environment: PYTHON (default .venv/bin/python, a CPU torch with the test extras), MAX_JOBS (2),
# KEEP_WORK=1 keeps the temporary build folder (its path is printed) for a rerun.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
# The build and the tests run in a temporary folder: a relative path must not stay relative
# (-s keeps a virtual environment's python link, whose target would lose the environment).
case "$PY" in */*) PY="$(realpath -s "$PY")" ;; esac
export MAX_JOBS="${MAX_JOBS:-2}"
LIBASAN="$(gcc -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "asan_check: libasan.so not found (install gcc's libasan)" >&2; exit 1; }
# libstdc++ preloaded too: ASan's __cxa_throw interceptor needs it loaded before Python starts,
# else the first C++ exception (a TORCH_CHECK) aborts.
PRELOAD="$LIBASAN $(gcc -print-file-name=libstdc++.so)"

WORK="$(mktemp -d)"
trap '[ -n "${KEEP_WORK:-}" ] && echo "asan_check: kept $WORK" || rm -rf "$WORK"' EXIT
# The tree as CI sees it: tracked and untracked-but-not-ignored files, no build outputs.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf -) | tar -C "$WORK/" -xf -

start=$(date +%s)
# -fno-sanitize-recover: a UBSan finding aborts like an ASan one instead of printing and going on.
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
(cd "$WORK" && GIVA_BUILD=cpu CFLAGS="$SAN" LDFLAGS="$SAN" "$PY" setup.py -q build_ext --inplace) \
  || { echo "asan_check: build failed" >&2; exit 1; }
echo "asan_check: built in $(( $(date +%s) - start )) s"

# Python and torch leak by design (interned objects, caches): no leak check. The rest is strict.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:alloc_dealloc_mismatch=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
[ $# -gt 0 ] || set -- tests/test_ops.py tests/test_sketch.py tests/test_adapters.py tests/test_properties.py \
  tests/test_numerics.py tests/test_cuda_emulation.py
# The CUDA kernels' CPU emulation is built with the same flags: ASan then reports any read or write
# outside a tensor that a kernel makes (what compute-sanitizer's memcheck does on a GPU).
export GIVA_EMULATION_CFLAGS="$SAN"
cd "$WORK"
# The instrumented library must be the one the tests load (not the editable install's).
LD_PRELOAD="$PRELOAD" PYTHONPATH="$WORK" "$PY" -c \
  'import giva_ext.ops as o, sys; assert o.HAS_NATIVE and o.__file__.startswith(sys.argv[1]), (o.__file__, o.LOAD_ERROR)' "$WORK"
# --capture=sys: a sanitizer report goes to file descriptor 2 and must reach the log before the abort.
LD_PRELOAD="$PRELOAD" PYTHONPATH="$WORK" "$PY" -m pytest -q -p no:cacheprovider --capture=sys "$@"
echo "asan_check: OK in $(( $(date +%s) - start )) s"
