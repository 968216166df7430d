# Set-up commands for a fresh machine: `make test` and `make demo` each create the virtual
# environment they need (CPU torch, the package with its native CPU ops, test/demo extras).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: test demo cuda-check wheels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python $(NATIVE_SOURCES)
	$(BIN)/pip install --quiet "$(TORCH)" numpy "setuptools>=77" wheel ninja
	GIVA_BUILD=cpu $(BIN)/pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

demo: $(VENV)/.installed
	$(BIN)/python -m giva_ext demo

# Compiles the CUDA kernels for sm_80 and sm_90 with a CUDA build of torch (no GPU needed).
cuda-check:
	bash tools/check_cuda_build.sh

# sdist + pure-Python, CPU and CUDA wheels into dist/ (after cuda-check made .venv-cuda), then the
# CPU wheel is installed into a fresh environment and smoke-tested there.
wheels: $(VENV)/.installed
	bash tools/build_wheels.sh $(wildcard .venv-cuda)
	bash tools/wheel_smoke.sh

clean:
	rm -rf build dist giva_ext/_C*.so giva_ext/_C.json *.egg-info
