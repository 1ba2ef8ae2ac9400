# The README's commands. Each target installs what it needs first, so a fresh clone works.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
NATIVE := $(wildcard kernels/*.cc kernels/*.h kernels/*.cu) CMakeLists.txt

.PHONY: test demo bench system-deps venv clean

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

# Debian packages the tests and the demo use (espeak-ng synthesises the styled-speech corpus).
system-deps:
	@if ! command -v espeak-ng >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else \
	    echo "espeak-ng is missing: run 'sudo apt-get install espeak-ng'"; exit 1; \
	  fi; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

demo: $(STAMP) system-deps
	@echo "make demo arrives with the default model (see README: What exists today)"; exit 1

bench: $(STAMP)
	$(PY) -m clapedge.bench

clean:
	rm -rf build $(VENV)
