# The README's commands. Each target installs what it needs first, so a fresh clone works.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
NATIVE := $(wildcard kernels/*.cc kernels/*.h kernels/*.cu) CMakeLists.txt

.PHONY: test demo bench system-deps venv clean kernels-arm kernels-cuda

# torch==2.13.0 is pinned for development and tests (a local CPU wheel on our machines);
# users of the [export] extra may use any torch>=2.4.
$(STAMP): pyproject.toml $(NATIVE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "scikit-build-core>=0.10" "nanobind>=2.0"
	$(PIP) install -q --no-build-isolation -e '.[export,train,bench,test]'
	touch $@

venv: $(STAMP)

# Debian packages the tests and the demo use (espeak-ng synthesises the styled-speech corpus;
# g++-aarch64-linux-gnu and qemu-user build and run the kernels' NEON levels).
system-deps:
	@if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 \
	    || ! command -v qemu-aarch64 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng g++-aarch64-linux-gnu qemu-user >/dev/null; \
	  else \
	    echo "missing Debian packages: run 'sudo apt-get install espeak-ng g++-aarch64-linux-gnu qemu-user'"; exit 1; \
	  fi; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

demo: $(STAMP) system-deps
	./demo.sh

bench: $(STAMP)
	$(PY) -m clapedge.bench

# The kernels beyond this machine (also part of `make test`): the NEON levels cross-compiled
# for aarch64 and run under qemu-user; the CUDA variant compiled with nvcc.
kernels-arm: $(STAMP) system-deps
	$(PY) -m pytest -q -rs tests/test_kernels_build.py -k neon

kernels-cuda: $(STAMP)
	$(PY) -m pytest -q -rs tests/test_kernels_build.py -k cuda

clean:
	rm -rf build $(VENV)
