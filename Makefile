# The README's two commands: `make run` and `make test`. Set-up is shared and idempotent.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
UV_INSTALL = $(UV) pip install -q -p $(BIN)/python --find-links $(FIND_LINKS) -c torch-constraint.txt
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test bench lint report clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v uv >/dev/null 2>&1 || test -x $(UV) || python3 -m pip install -q --user uv
	test -x $(BIN)/python || $(UV) venv -q -p python3.11 $(VENV)
	$(UV_INSTALL) -r requirements.lock
	@# lmms-eval pulls torchvision from PyPI, whose compiled ops do not match the local CPU torch
	@# and break `import transformers`' vision models; nothing here needs it.
	$(UV) pip uninstall -q -p $(BIN)/python torchvision 2>/dev/null || true
	$(UV_INSTALL) --no-deps -e .
	@# DADApy (reference estimators for the geometry tests) pins numpy<2 and jax; its pure-Python
	@# estimators are all we call, so it goes in without its dependencies.
	$(UV_INSTALL) --no-deps dadapy==0.3.4 || echo "dadapy not installed: its comparison tests will skip"
	touch $@

run: setup
	snakemake --cores all
	snakemake --report $(CURDIR)/results/report.html
	@echo "Results: $(CURDIR)/results   Report: $(CURDIR)/results/report.html"

test: setup
	$(BIN)/pytest -q -rs --durations=15

bench: setup
	@# the extraction benchmark times the tiny world's tuned VLM on its analysis set
	snakemake --cores all results/models/tuned results/world/analysis.parquet
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_probe.py
	$(BIN)/python benchmarks/bench_geometry.py
	$(BIN)/python benchmarks/bench_workflow.py
	@echo "Benchmarks written to results/bench/"

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow
	snakemake --lint --cores 1

clean:
	rm -rf results/* .snakemake logs
