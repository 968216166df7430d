# Set-up commands for a fresh machine: `make test` and `make demo` each create the virtual
# environment they need (CPU torch, the package with its native CPU ops, test/demo extras).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: test demo cuda-check wheels clean bench bench-smoke asan quality

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

# Benchmark suite (bench/, pytest-benchmark): GiVA against LoRA and VeRA. `bench` runs the default
# size (about 5 minutes on 2 idle CPU cores) into bench/results/suite_$(BENCH_DEVICE).json, .md
# and .png; `bench-smoke` runs the accuracy benchmark at its quick size (one method of each kind,
# 2 seeds), every suite case once (quick size, no timing) and renders that JSON, then the
# standalone scripts once on tiny shapes in float32 and bfloat16 (gpu_check.sh runs them in half
# precision), the all-reduce volume count (two gloo processes on MiniLM, about 20 s) and the
# quantized-base comparison on tiny batches.
BENCH_DEVICE ?= cpu
BENCH_OUT := bench/results/suite_$(BENCH_DEVICE)
SMOKE_OUT := build/bench-smoke/suite

bench: $(VENV)/.installed
	$(BIN)/python -m pytest bench/ --bench-size default --bench-device $(BENCH_DEVICE) \
		--benchmark-columns=median,iqr,rounds --benchmark-json $(BENCH_OUT).json
	$(BIN)/python bench/report.py $(BENCH_OUT).json

# Accuracy benchmark (bench/quality.py): every method on VADER and AG News, learning rates from a
# validation sweep, 3 seeds; about 30 minutes on 2 CPU cores (QUALITY_SIZE=large: about 3 hours).
QUALITY_SIZE ?= default

quality: $(VENV)/.installed
	$(BIN)/python bench/quality.py --size $(QUALITY_SIZE) --out bench/results/quality$(if $(filter-out default,$(QUALITY_SIZE)),_$(QUALITY_SIZE))

bench-smoke: $(VENV)/.installed
	mkdir -p $(dir $(SMOKE_OUT))
	$(BIN)/python bench/quality.py --size quick --seeds 2 --no-progress \
		--methods head,lora8,vera8,giva8-VrU2r,giva8-VrUr-rms-input --out $(dir $(SMOKE_OUT))quality
	$(BIN)/python -m pytest bench/ -q --bench-size quick --bench-device cpu --benchmark-disable \
		--benchmark-json $(SMOKE_OUT).json
	$(BIN)/python bench/report.py $(SMOKE_OUT).json
	for dtype in float32 bfloat16; do \
		$(BIN)/python bench/layer_overhead.py --dtype $$dtype --shapes 64x48x40 --ranks 4 --reps 1 \
			--warmup 0 --profile --json $(dir $(SMOKE_OUT))layer_overhead_$$dtype.json && \
		$(BIN)/python bench/mixed_adapters.py --dtype $$dtype --sequences 4 --seq-len 8 --adapters 3 \
			--dims 64 --reps 1 --warmup 0 --json $(dir $(SMOKE_OUT))mixed_adapters_$$dtype.json || exit 1; \
	done
	$(BIN)/python bench/allreduce_volume.py --json $(dir $(SMOKE_OUT))allreduce.json
	$(BIN)/python bench/quantized.py --bases fp32,nf4,torchao-int8 --batch 2x8 --reps 1 --steps 2 \
		--seeds 1 --json $(dir $(SMOKE_OUT))quantized.json

# The native-op tests against the CPU ops built with AddressSanitizer + UBSan (in a temporary copy).
asan: $(VENV)/.installed
	PYTHON=$(BIN)/python bash tools/asan_check.sh

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
