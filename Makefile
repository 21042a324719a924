# One-command set-up: every target installs into .venv at the repo root on first use.
#   make demo   -> writes demo.mp4 from the sample shipped in runtime/assets
#   make test   -> the CPU test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test test-all gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (CI and laptops); on a CUDA machine install torch first and this is a no-op
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.5"
	$(PY) -m pip install -q -e ".[test,export,train]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m runtime.generate --out demo.mp4

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# on a CUDA machine: every gpu test + GPU benchmarks -> bench/results/<date>-<gpu>.{json,md}.
# Uses the machine's own python3 and CUDA torch (GPU images ship them; no venv, no downloads).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info demo.mp4
