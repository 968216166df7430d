#!/usr/bin/env bash
# Builds the release files into dist/:
#   giva_ext-X.Y.Z.tar.gz                          sdist: builds the native ops for the installer's torch
#   giva_ext-X.Y.Z-py3-none-any.whl                GIVA_BUILD=none: pure Python, runs the reference ops
#   giva_ext-X.Y.Z+cputorchA.B-<python>-<platform>.whl     GIVA_BUILD=cpu, against the torch in GIVA_CPU_VENV
#   giva_ext-X.Y.Z+cuNNNtorchA.B-<python>-<platform>.whl   GIVA_BUILD=cuda, against the torch in CUDA_VENV
#                                                  (only when CUDA_VENV is given)
#
# Usage: tools/build_wheels.sh [CUDA_VENV]
#
# Each wheel is built from its own clean copy of the tree (tracked and untracked-but-not-ignored
# files), so no library from an earlier build can land in another wheel, then checked: a native
# wheel holds giva_ext/_C*.so and its build record giva_ext/_C.json, the none wheel neither.
# A native wheel runs only under the torch major.minor (and CUDA major) it names; giva_ext warns
# and uses the reference ops otherwise. The wheels are plain linux_x86_64 wheels, not manylinux.
#
# Environment: GIVA_CPU_VENV (default .venv; torch, setuptools>=77, wheel, ninja), CUDA_HOME
# (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CPU_VENV="${GIVA_CPU_VENV:-$ROOT/.venv}"
CUDA_VENV="${1:-}"
DIST="$ROOT/dist"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export MAX_JOBS="${MAX_JOBS:-2}"

fail() { echo "build_wheels: FAIL: $*" >&2; exit 1; }

[ -x "$CPU_VENV/bin/python" ] || fail "no python in $CPU_VENV (run make test, or set GIVA_CPU_VENV)"
CPU_VENV="$(cd "$CPU_VENV" && pwd)"  # the builds run in other directories
if [ -n "$CUDA_VENV" ]; then
  [ -x "$CUDA_VENV/bin/python" ] || fail "no python in $CUDA_VENV"
  CUDA_VENV="$(cd "$CUDA_VENV" && pwd)"
  "$CUDA_VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' \
    || fail "torch in $CUDA_VENV was built without CUDA"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DIST"

# A clean copy of the tree in $WORK/$1, without the build record of an in-place build.
clean_copy() {
  mkdir -p "$WORK/$1"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf -) | tar -C "$WORK/$1" -xf -
  rm -f "$WORK/$1/giva_ext/_C.json"
}

# build_wheel MODE PYTHON: builds one wheel into dist/ and checks what it holds.
build_wheel() {
  local mode=$1 py=$2
  clean_copy "$mode"
  mkdir -p "$WORK/out-$mode"
  echo "build_wheels: GIVA_BUILD=$mode with $("$py" -c 'import torch; print("torch", torch.__version__)')"
  local start; start=$(date +%s)
  (cd "$WORK/$mode" && GIVA_BUILD=$mode "$py" -m pip wheel --quiet --no-build-isolation --no-deps \
    -w "$WORK/out-$mode" .) || fail "GIVA_BUILD=$mode wheel build failed"
  local wheel; wheel=$(ls "$WORK/out-$mode"/giva_ext-*.whl)
  "$py" - "$wheel" "$mode" <<'PYEOF' || fail "$(basename "$wheel") has the wrong contents"
import json, sys, zipfile
wheel, mode = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
libs = [n for n in names if n.startswith("giva_ext/_C") and n.endswith(".so")]
if mode == "none":
    assert not libs and "giva_ext/_C.json" not in names, f"native files in a none wheel: {libs}"
else:
    assert len(libs) == 1, f"want one giva_ext/_C*.so, found {libs}"
    record = json.loads(zipfile.ZipFile(wheel).read("giva_ext/_C.json"))
    assert record["mode"] == mode, f"build record says {record['mode']}"
    print("build_wheels:   build record", record)
PYEOF
  cp "$wheel" "$DIST/"
  echo "build_wheels:   dist/$(basename "$wheel") ($(( $(date +%s) - start )) s)"
}

clean_copy sdist
(cd "$WORK/sdist" && GIVA_BUILD=none "$CPU_VENV/bin/python" -c \
  'import sys; from setuptools.build_meta import build_sdist; print(build_sdist(sys.argv[1]))' \
  "$DIST" >/dev/null) || fail "sdist build failed"
echo "build_wheels: dist/$(cd "$DIST" && ls -t giva_ext-*.tar.gz | head -n1)"
build_wheel none "$CPU_VENV/bin/python"
build_wheel cpu "$CPU_VENV/bin/python"
if [ -n "$CUDA_VENV" ]; then
  build_wheel cuda "$CUDA_VENV/bin/python"
fi
echo "build_wheels: OK"
