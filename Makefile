# One command each, on a fresh machine: `make demo` (the main job) and `make test` (all tests).
# Both create .venv, install the pinned requirements and the Debian packages the C++ tests and
# benchmarks need, and build the extension; a second run with nothing changed rebuilds nothing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CMAKE_BUILD := build/cmake
CUDA_CHECK := build/cuda-check
APT_PACKAGES := g++ cmake ninja-build libgtest-dev libbenchmark-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NVCC := $(shell command -v nvcc 2>/dev/null)

EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)

.PHONY: test demo bench bench-peers lint cpp-test cpp-sanitize py-test cuda-check gpu-check sanitize wheel-check apt clean

test: lint cpp-test cpp-sanitize cuda-check py-test wheel-check

# nn.Linear against SpatialLayer on digits: a table, report.md and PNGs in ./spatium_report.
demo: $(VENV)/.ext-built
	$(VENV)/bin/spatium-torch compare

bench: $(CMAKE_BUILD)/build.ninja $(VENV)/.ext-built
	cmake --build $(CMAKE_BUILD) --target core_benchmarks
	$(PY) benchmarks/run_cpp_benchmarks.py --binary $(CMAKE_BUILD)/core_benchmarks --out benchmarks/RESULTS.md

# Frozen inference against torch int8/int4 and bitsandbytes / torchao (installed without deps).
bench-peers: $(VENV)/.ext-built
	$(PY) -m pip install -q --no-deps -r requirements/bench.txt
	$(PY) benchmarks/bench_peers.py

# --- set-up ------------------------------------------------------------------------------------
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.requirements-installed: $(wildcard requirements/*.txt) | $(PY)
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps -r requirements/integrations.txt
	touch $@

$(VENV)/.ext-built: $(VENV)/.requirements-installed $(EXT_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(CMAKE_BUILD)/build.ninja: CMakeLists.txt | apt
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release

# --- tests -------------------------------------------------------------------------------------
# The wheel, built as a user would build it, installed into a fresh venv with only its declared
# dependencies (the pinned torch) and smoke-tested from outside the source tree.
WHEEL_CHECK := build/wheel-check
wheel-check: $(VENV)/.requirements-installed
	rm -rf $(WHEEL_CHECK) && mkdir -p $(WHEEL_CHECK)
	$(PY) -m build --wheel --no-isolation --outdir $(WHEEL_CHECK)/dist .
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/python -m pip install -q $(WHEEL_CHECK)/dist/*.whl
	cd $(WHEEL_CHECK) && venv/bin/python $(CURDIR)/tests/wheel_smoke.py
	$(WHEEL_CHECK)/venv/bin/spatium-torch --version

lint: $(VENV)/.requirements-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

cpp-test: $(CMAKE_BUILD)/build.ninja
	cmake --build $(CMAKE_BUILD) -j 2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

py-test: $(VENV)/.ext-built
	$(PY) -m pytest -q tests

# The C++ tests built with AddressSanitizer and UBSan (in build/sanitize, leaving the regular
# build alone); any report fails the run.
SANITIZE := build/sanitize
cpp-sanitize: | apt
	cmake -S . -B $(SANITIZE)/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPATIUM_SANITIZE=ON \
	  -DSPATIUM_BUILD_BENCHMARKS=OFF
	cmake --build $(SANITIZE)/cmake -j 2
	ctest --test-dir $(SANITIZE)/cmake --output-on-failure

# Also the extension built with them, running the tests of the ops, the store, states, growth
# and the fuzzing (about 15 minutes on two cores).
SANITIZED_TESTS := tests/test_spatial_ops.py tests/test_memory_and_state.py tests/test_store.py \
	tests/test_growth.py tests/test_reference.py tests/test_fuzz.py
SANITIZER_RUNTIME := $$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)

sanitize: cpp-sanitize $(VENV)/.requirements-installed
	SPATIUM_SANITIZE=1 USE_CUDA=0 $(PY) setup.py -q build_ext \
	  --build-temp $(SANITIZE)/ext-temp --build-lib $(SANITIZE)/ext
	rm -rf $(SANITIZE)/pkg && mkdir -p $(SANITIZE)/pkg && cp -r spatium_torch $(SANITIZE)/pkg/
	cp $(SANITIZE)/ext/spatium_torch/_C*.so $(SANITIZE)/pkg/spatium_torch/
	# torch itself is not instrumented: leaks and container overflows are its business
	LD_PRELOAD="$(SANITIZER_RUNTIME)" PYTHONPATH=$(SANITIZE)/pkg \
	  ASAN_OPTIONS=detect_leaks=0:detect_container_overflow=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PY) -m pytest -q -p no:cacheprovider $(SANITIZED_TESTS)

# Compiles the CUDA sources with nvcc where the extension itself is built without CUDA (a CPU
# torch), so that they keep compiling on machines with no GPU. A CPU torch lacks one generated
# CUDA header; a stand-in defines what a real CUDA build of torch defines there.
ifeq ($(NVCC),)
cuda-check:
	@echo "cuda-check: no nvcc on this machine, CUDA sources not compiled"
else
TORCH_INCLUDES = $$($(PY) -c "import sysconfig, torch.utils.cpp_extension as c; \
	print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")

# The .cu files, and the registration of their kernels as a CUDA build compiles it.
cuda-check: $(patsubst csrc/cuda/%.cu,$(CUDA_CHECK)/%.o,$(CUDA_SOURCES)) \
	$(CUDA_CHECK)/register-with-cuda.checked

$(CUDA_CHECK)/register-with-cuda.checked: csrc/register.cpp csrc/kernels.h \
		$(VENV)/.requirements-installed
	mkdir -p $(dir $@)
	g++ -fsyntax-only -std=c++20 -DSPATIUM_WITH_CUDA -Icsrc $(TORCH_INCLUDES) $<
	touch $@

$(CUDA_CHECK)/include/c10/cuda/impl/cuda_cmake_macros.h:
	mkdir -p $(dir $@)
	printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > $@

$(CUDA_CHECK)/%.o: csrc/cuda/%.cu $(shell find csrc -name '*.h') $(VENV)/.requirements-installed \
		$(CUDA_CHECK)/include/c10/cuda/impl/cuda_cmake_macros.h
	$(NVCC) -c -std=c++20 -O3 --expt-relaxed-constexpr -arch=sm_90 -Icsrc -I$(CUDA_CHECK)/include \
	  $(TORCH_INCLUDES) $< -o $@
endif

# On a GPU machine (its own python3 and torch, no network): build for the local GPU, the CUDA
# tests, the GPU benchmark; results and a log in $OUT. See .ci/gpu-check.
gpu-check:
	.ci/gpu-check

clean:
	rm -rf build spatium_torch/*.so $(VENV)/.ext-built
