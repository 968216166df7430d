#!/usr/bin/env bash
# Installs the CPU wheel from dist/ into a fresh virtual environment (torch 2.13.0) and checks it
# there: it imports from that environment, loads its native library, runs GiVALinear forward and
# backward on the native op, and `giva env` works. Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheel=$(ls "$ROOT"/dist/giva_ext-*+cputorch*.whl 2>/dev/null | head -n1)
[ -n "$wheel" ] || { echo "wheel_smoke: FAIL: no CPU wheel in dist/ (run tools/build_wheels.sh)" >&2; exit 1; }
VENV="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$VENV")"' EXIT
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0 "$wheel"
cd "$(dirname "$VENV")"  # away from the source tree, so the installed package is the one imported
"$VENV/bin/python" -W error::RuntimeWarning - <<'PYEOF'
import torch
import giva_ext
from giva_ext import ops

assert ops.HAS_NATIVE, ops.LOAD_ERROR
assert "/venv/" in giva_ext.__file__, giva_ext.__file__
layer = giva_ext.GiVALinear(16, 8, r=2)
with torch.no_grad():
    layer.lambda_o.normal_()
x = torch.randn(4, 16, requires_grad=True)
assert ops.supports(x)
y = layer(x)
expected = layer.base(x) + layer.lambda_o * ((layer.lambda_s * (x @ layer.A.t())) @ layer.B.t())
torch.testing.assert_close(y, expected)
y.sum().backward()
assert x.grad is not None and layer.lambda_s.grad is not None and layer.base.weight.grad is None
print("wheel_smoke: native op OK in", giva_ext.__file__)
PYEOF
"$VENV/bin/giva" env
echo "wheel_smoke: OK"
