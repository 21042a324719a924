# One-command set-up: every target installs into .venv at the repo root on first use, from the lock file.
#   make demo         -> writes demo.mp4 from the sample shipped in runtime/assets
#   make test         -> the CPU test suite (what CI runs)
#   make serve        -> the live server and its page on http://127.0.0.1:8080/ (the shipped toy-talker)
#   make lock         -> re-resolve requirements-lock.txt from the ranges in pyproject.toml
#   make test-latest  -> the suite on the newest versions the ranges allow, in a throwaway venv
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-lock.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
EXTRAS := test,export,train,serve,livekit,pipecat,ray
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.7.0
# Exact versions the lock holds where the newest in range is not the one wanted: transformers 4.49.0 is the version
# the official AvatarForcing code pins (its wav2vec2 features were checked bit for bit against it); `make
# test-latest` covers the newest 5.x.
LOCK_PINS := transformers==4.49.0
LATEST_VENV ?= /tmp/avatar-runtime-latest

.PHONY: install demo serve test test-all test-latest lock gpu-check clean

# A changed lock or pyproject rebuilds .venv from scratch, so that it holds exactly the lock (pip install -r adds
# and upgrades, but never removes a package the lock dropped).
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "pip==$(PIP_VERSION)"
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m runtime.generate --out demo.mp4

serve: $(STAMP)
	$(PY) -m runtime.serve

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# pip-tools, not uv: it resolves with pip itself, so pip's configuration applies (here: the local CPU build of
# torch, which uv does not see and would replace with a multi-GB CUDA build), and the lock installs with plain pip.
# The lock keeps torch's version without its local build label (+cpu): pip then installs the platform's own build.
lock:
	python3 -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install -q "pip==$(PIP_VERSION)" "pip-tools==$(PIP_TOOLS_VERSION)"
	printf '%s\n' $(LOCK_PINS) > $(VENV)-lock/pins.txt
	$(VENV)-lock/bin/pip-compile -q --upgrade --allow-unsafe --all-build-deps --strip-extras --no-emit-index-url \
		--no-emit-find-links --extra $(subst $(comma), --extra ,$(EXTRAS)) --constraint $(VENV)-lock/pins.txt \
		--output-file $(LOCK) pyproject.toml
	sed -i -E 's/^(torch==[^+ ]+)\+[a-z0-9.]+/\1/; s|-c $(VENV)-lock/pins.txt|make lock: LOCK_PINS|' $(LOCK)
	rm -rf $(VENV)-lock

test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade ".[$(EXTRAS)]"
	rm -rf build avatar_runtime.egg-info
	$(LATEST_VENV)/bin/pip check
	$(LATEST_VENV)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|numpy|av|pillow|onnx|onnxruntime|onnxscript|triton|kernels|huggingface.hub|tokenizers|safetensors|aiortc|fastapi|uvicorn)=='
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

comma := ,

# on a CUDA machine: the GPU tests, then the GPU benchmarks, each stage capped, 8 minutes in all on one H100 ->
# bench/results/<date>-<gpu>.{json,md}, rewritten after each stage. Uses the machine's own python3 and CUDA torch
# (GPU images ship them; no venv, no downloads, no PyAV or soxr needed). GPU_CHECK_ARGS="--results DIR" writes
# elsewhere (e.g. a folder that is copied back); `python -m bench.gpu_check --dry-run` runs the stand-ins on a CPU.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo.mp4
