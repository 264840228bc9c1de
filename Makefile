# The verbs the README names. Everything runs from the project venv (.venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENTOML := $(VENV)/bin/bentoml
STAMP := $(VENV)/.installed
PORT ?= 3000
export HF_HUB_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := True

.PHONY: install model eval serve migrate bento test lint bench bench-analytics

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first and pinned: the CPU wheel. Any looser spec resolves a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

model: install  ## full build of both models into the BentoML store (skipped if present)
	$(PY) -m models.build --profile full

eval: model  ## accuracy, calibration and latency of both stored models
	$(PY) -m models.evaluate

serve: model  ## the API on http://127.0.0.1:$(PORT), embedded cache, limiter and SQLite
	$(BENTOML) serve service.service:Sentiment --port $(PORT)

migrate: install  ## apply the analytics migrations to DATABASE_URL (bentoml serve also does, once)
	$(PY) -m storage.migrate upgrade

bento: model  ## a versioned Bento recording both model tags
	$(BENTOML) build

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install  ## the whole suite: lint, unit, service and integration tests
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest

bench: model  ## raw model throughput and HTTP load at 1/16/64 clients, unique and repeated texts
	$(PY) -m loadtests.bench

bench-analytics: install  ## /analytics query times on PostgreSQL over a seeded million-row table
	$(PY) loadtests/analytics_bench.py $(if $(DATABASE_URL),--url $(DATABASE_URL),)
