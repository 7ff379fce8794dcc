# Two commands matter: `make demo` (the main job) and `make test`. Both set up everything themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3.11
VENV        := $(CURDIR)/.venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

# A project-local, git-ignored Airflow home; the dags and plugins folders are this checkout's.
export AIRFLOW_HOME                    ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER      := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER   := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES    := False
export PATH                            := $(VENV)/bin:$(PATH)

EMULATOR_PORT ?= 8099
EMULATOR_ARGS ?=
AIRFLOW_PORT  ?= 8080
CLUSTER_S3_PORT ?= 9100

.PHONY: help venv test lint demo emulator airflow airflow-cluster cluster-deps bench browser clean

help:
	@echo "make demo      run bulk_extraction then overnight_report end to end (emulator unless ANTHROPIC_API_KEY is set)"
	@echo "make test      lint + the whole test suite (unit, emulator conformance, real Airflow end to end, UI in Chromium)"
	@echo "make emulator  serve the Message Batches API emulator on 127.0.0.1:\$$EMULATOR_PORT (foreground)"
	@echo "make airflow   airflow standalone with this project and the emulator, UI on \$$AIRFLOW_PORT"
	@echo "make airflow-cluster  Postgres, Redis, S3 (moto, \$$CLUSTER_S3_PORT), scheduler, triggerer, 2 Celery workers"
	@echo "make bench     benchmarks (ratios measured side by side)"

# The venv is rebuilt when it is missing or when a requirements file changed since it was built.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $(STAMP)

venv: $(STAMP)

# Debian's Chromium for the UI test; installed when missing and we may (root, apt reachable).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the UI browser test will fail"; \
	  else echo "warning: chromium missing and cannot be installed here; the UI browser test will fail"; fi; }

# Debian's Postgres and Redis for `make airflow-cluster` and the cluster test; installed like Chromium.
cluster-deps:
	@{ command -v redis-server >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null) \
	      || echo "warning: could not install postgresql and redis-server; the cluster will not start"; \
	  else echo "warning: postgresql or redis-server missing and cannot be installed here; the cluster will not start"; fi; }

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) browser cluster-deps
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) include/demo/run_demo.py

emulator: $(STAMP)
	cd include && $(PY) -m batches_emulator --port $(EMULATOR_PORT) $(EMULATOR_ARGS)

airflow: $(STAMP)
	$(PY) include/demo/run_airflow.py --port $(AIRFLOW_PORT)

# Foreground like `make airflow`; its own AIRFLOW_HOME under .airflow/cluster; Ctrl-C stops everything.
airflow-cluster: $(STAMP) cluster-deps
	PYTHONPATH=$(CURDIR)/plugins:$(CURDIR)/include $(PY) -m demo.cluster --port $(AIRFLOW_PORT) --s3-port $(CLUSTER_S3_PORT)

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(AIRFLOW_HOME) data test-artifacts .pytest_cache .ruff_cache
