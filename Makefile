# credbroker — every target sets up what it needs (venv, npm tools, Debian packages).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
NODE_BIN := $(CURDIR)/node_modules/.bin
export PATH := $(BIN):$(NODE_BIN):$(PATH)

# Debian packages the test suite needs (installed only when missing).
DEB_PACKAGES := docker.io docker-registry busybox-static iproute2 util-linux procps

CREDBROKER_DATA_DIR ?= $(CURDIR)/.data
PROTOS := $(wildcard proto/broker/v1/*.proto)
PROTOC = $(BIN)/python -m grpc_tools.protoc -Iproto -Ithird_party/googleapis \
	-I$$($(BIN)/python -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

.PHONY: help setup run test unit integration bench proto check-proto lint typecheck fmt clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

.system-packages: Makefile
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	touch $@

setup: $(VENV)/.installed node_modules/.installed .system-packages ## Create the venv and install every prerequisite

run: setup ## Start the broker on its embedded store (data in ./.data)
	CREDBROKER_DATA_DIR=$(CREDBROKER_DATA_DIR) $(BIN)/credbroker serve

test: setup check-proto lint typecheck ## Set up, check and run the whole suite
	$(BIN)/pytest

unit: setup ## Run only the unit tests
	$(BIN)/pytest tests/unit

bench: setup ## Hot read paths, pull-secret syncs and Swarm pulls, as ratios to baselines of the same run
	$(BIN)/python -m benchmarks.bench_rpc
	$(BIN)/python -m benchmarks.bench_pull_secrets
	$(BIN)/python -m benchmarks.bench_swarm

proto: setup ## Regenerate broker/v1 from proto/
	buf lint
	$(PROTOC) --python_out=. --grpc_python_out=. --pyi_out=. --mypy_grpc_out=. $(PROTOS)

check-proto: setup ## Fail when the committed generated code differs from proto/
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	$(PROTOC) --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp --mypy_grpc_out=$$tmp $(PROTOS) && \
	diff -r -x __init__.py -x __pycache__ $$tmp/broker/v1 broker/v1 \
	|| { echo "generated code is stale: run 'make proto' and commit broker/v1"; exit 1; }

lint: setup ## buf lint, ruff
	buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup ## mypy --strict on broker/ and clients/
	$(BIN)/mypy

fmt: setup ## Format the Python code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Remove the venv, node tools and caches (keeps ./.data)
	rm -rf $(VENV) node_modules .system-packages .pytest_cache .mypy_cache .ruff_cache
