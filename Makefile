# lineareval: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-all collect clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install the pinned requirements and the package

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: setup ## full cache and every policy at keep=1/4 on the tiny model with RANDOM weights (machinery only)
	@echo "NOTE: llamagen_tiny with RANDOM weights: images are noise; this shows the cache machinery and costs."
	$(PY) run.py -m weights=random num_samples=8 batch_size=4 cache=full keep=1
	$(PY) run.py -m weights=random num_samples=8 batch_size=4 cache=window,streamingllm,h2o,linear keep=1/4
	$(PY) scripts/summarize.py outputs/samples/llamagen_tiny

test: setup ## the default test suite (CPU, no downloads; excludes slow and gpu tests)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup ## every test, slow ones included
	$(PY) -m pytest $(PYTEST_ARGS)

collect: setup ## gather every finished run under outputs/ into results/*.csv (beside the paper's numbers)
	$(PY) scripts/collect.py outputs --out results

clean: ## remove run outputs (keeps .venv and weights/)
	rm -rf outputs multirun
