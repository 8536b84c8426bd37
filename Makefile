# lineareval: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Sweeps (conf/experiment/): LAUNCHER=local runs a sweep's runs one after another in this process (Hydra's
# basic launcher); LAUNCHER=slurm submits them as one Slurm array (conf/hydra/launcher/slurm.yaml) and
# waits. ARGS adds Hydra overrides, e.g. ARGS='hydra.launcher.partition=gpu hydra.launcher.timeout_min=600'.
LAUNCHER ?= local
ARGS ?=
SWEEP = $(PY) run.py -m $(if $(filter slurm,$(LAUNCHER)),hydra/launcher=slurm)

ifeq ($(filter $(LAUNCHER),local slurm),)
$(error LAUNCHER must be local or slurm, not '$(LAUNCHER)')
endif

# A quality grid: the full-cache baseline (full accepts only keep=1) and the experiment's policy x keep
# sweep. On Slurm both are submitted at once (each launcher waits for its own jobs); locally, in turn.
ifeq ($(LAUNCHER),slurm)
grid = $(SWEEP) experiment=$(1) cache=full keep=1 $(ARGS) & baseline=$$!; \
	$(SWEEP) experiment=$(1) $(ARGS); status=$$?; wait $$baseline && exit $$status
else
grid = $(SWEEP) experiment=$(1) cache=full keep=1 $(ARGS) && $(SWEEP) experiment=$(1) $(ARGS)
endif

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-all collect clean efficiency imagenet coco dpg ablations allocations perf gpu-report decoding-sweep

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install the pinned requirements and the package

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: setup ## the embedded trained demo model: full cache and every policy at keep=1/4 on the same seeds; FID table + sample grid
	$(PY) run.py model=demo benchmark=demo_fid cache=full keep=1
	$(PY) run.py -m model=demo benchmark=demo_fid 'cache=glob(*,exclude=full)' keep=1/4
	$(PY) scripts/demo_report.py outputs/demo_fid/demo

test: setup ## the default test suite (CPU, no downloads; excludes slow and gpu tests)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup ## every test, slow ones included
	$(PY) -m pytest $(PYTEST_ARGS)

efficiency: setup ## the paper's efficiency table: every policy vs full, six models at its batch sizes (random weights)
	$(SWEEP) experiment=efficiency $(ARGS)

imagenet: setup ## ImageNet FID, LlamaGen-XL: full + every policy of conf/cache/ x keep 1/4,1/6,1/8
	$(call grid,imagenet)

coco: setup ## COCO FID + CLIP score, Janus-Pro-1B: full + every policy x keep 1/4,1/6,1/8
	$(call grid,coco)

dpg: setup ## DPG-Bench, Lumina-mGPT-768: full + every policy x keep 1/4,1/6,1/8
	$(call grid,dpg)

ablations: setup ## LineAR ablations on ImageNet FID (LlamaGen-XL): keep, anchors, recent lines, score source
	for experiment in ablation_keep ablation_anchors ablation_recent_lines ablation_score_source; do \
		$(SWEEP) experiment=$$experiment $(ARGS) || exit 1; done

allocations: setup ## demo model, 400 samples: full + every policy x budget allocation (uniform, pyramid, adaptive_heads) x keep 1/4,1/8; table + figure in results/
	$(SWEEP) experiment=allocations cache=full keep=1 budget_allocation=uniform $(ARGS)
	$(SWEEP) experiment=allocations $(ARGS)
	$(PY) scripts/allocation_report.py outputs/demo_fid/demo --out results

perf: setup ## CPU performance report into results/ (efficiency, roofline, per-step latency); OFFICIAL=path/to/LlamaGen adds the official loop
	$(PY) scripts/perf_report.py $(if $(OFFICIAL),--official $(OFFICIAL),--skip-official)

gpu-report: setup ## GPU efficiency report into results/ (about 8 minutes on one H100/H200): XL compiled and eager, max batch, Janus, Lumina, floors
	$(PY) scripts/gpu_report.py $(ARGS)

decoding-sweep: setup ## where each decoding wins: batch 1..16 x sequential/sjd/sjd_pp/gsd/mc_sjd x full, linear 1/4, 1/6 on the demo model; CSV, crossover, figure and passes per token of each variant in results/
	$(PY) scripts/decoding_sweep.py $(ARGS)
	$(PY) scripts/decoding_sweep.py --passes

collect: setup ## gather every finished run under outputs/ into results/*.csv (beside the paper's numbers)
	$(PY) scripts/collect.py outputs --out results

clean: ## remove run outputs (keeps .venv and weights/)
	rm -rf outputs multirun
