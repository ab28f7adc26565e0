# The lab's entry points. `make demo` and `make test` run `make setup` first; `make setup`
# is idempotent: every step is a file target (or a cheap check), so a second run does no work.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
UV_VERSION  := 0.13.9
MINIO_MODULE  := $(shell sed -n 's/^MINIO_MODULE = "\(.*\)"/\1/p' lib/dtrain/versions.py)
MINIO_VERSION := $(shell sed -n 's/^MINIO_VERSION = "\(.*\)"/\1/p' lib/dtrain/versions.py)
MINIO_BIN   := tools/bin/.minio-$(MINIO_VERSION)
APT_PACKAGES := dataset-fashion-mnist shellcheck
STAMP       := $(VENV)/.installed
QUICK       ?=
PYTEST_ARGS ?=

.PHONY: help setup apt demo test lint bench slides lock clean stop

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: apt $(STAMP) $(MINIO_BIN) ## install everything (apt packages, Python lock, MinIO); idempotent

apt: ## Debian packages: Fashion-MNIST files and shellcheck (needs root; skipped if present)
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "setup: apt-get install $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else echo "setup: WARNING: cannot apt-get install $(APT_PACKAGES) (not root or no apt); continuing"; fi

$(STAMP): requirements.lock pyproject.toml
	@echo "setup: Python environment from requirements.lock"
	@[ -x $(PY) ] || $(PYTHON_BOOT) -m venv $(VENV)
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null
	@$(PY) -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	@VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip install -q --compile-bytecode -r requirements.lock
	@VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip install -q --no-deps -e .
	@$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

$(MINIO_BIN):
	@command -v go >/dev/null || { echo "setup: WARNING: no Go toolchain: 'dtrain s3 up' will fall back to moto"; exit 0; }
	@echo "setup: go install $(MINIO_MODULE)@$(MINIO_VERSION) (a few minutes the first time)"
	@GOBIN=$(CURDIR)/tools/bin GOFLAGS=-trimpath go install $(MINIO_MODULE)@$(MINIO_VERSION)
	@touch $@  # one stamp per pinned version: bumping the pin rebuilds

lock: ## re-resolve requirements.in into requirements.lock
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip compile --python 3.11 --no-header requirements.in -o requirements.lock

demo: setup ## run notebooks 01→05 locally with papermill; executed copies + HTML report under runs/
	$(PY) scripts/run_notebooks.py --mode local

lint: setup ## ruff, shellcheck, YAML and notebook-policy checks
	$(VENV)/bin/ruff check .
	shellcheck scripts/*.sh .ci/run
	$(PY) -m dtrain k8s validate manifests/
	$(PY) scripts/check_notebooks.py
	$(PY) scripts/check_secrets.py

test: setup ## the whole suite: lint, unit, integration (real MinIO + Ray), notebooks
	$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: setup ## benchmarks (QUICK=1 for a ~5 minute run); writes bench/results/latest.json
	$(PY) bench/run.py $(if $(QUICK),--quick,)

slides: setup ## the exam deck: reveal.js slides from the executed notebooks
	$(PY) scripts/make_slides.py

stop: ## stop the local Ray cluster and MinIO if they run
	-$(PY) -m dtrain cluster down
	-$(PY) -m dtrain s3 down

clean: stop ## remove run outputs and state (keeps .venv and tools/)
	rm -rf .dtrain runs slides
