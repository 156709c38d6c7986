# The commands people and CI both run. Each installs only when pyproject.toml changed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install demo test test-unit test-integration test-system services tools lint bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[postgres,demo,dev,data]'
	@touch $(STAMP)

demo: install
	$(PY) devtools/demo.py $(ARGS)

services:
	bash devtools/services.sh

tools:
	bash devtools/tools.sh

test: install services tools
	$(PY) -m pytest -p no:cacheprovider tests/unit tests/integration tests/system $(PYTEST_ARGS)

test-unit: install tools
	$(PY) -m pytest -p no:cacheprovider tests/unit $(PYTEST_ARGS)

test-integration: install services
	$(PY) -m pytest -p no:cacheprovider tests/integration $(PYTEST_ARGS)

test-system: install services tools
	$(PY) -m pytest -p no:cacheprovider tests/system $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check airflow_asyncq_provider devtools tests bench

bench: install
	$(PY) bench/run.py $(ARGS)

# The reliability run (docs/RELIABILITY.md): root, 15-30 min; not in CI. ARGS="--minutes 2 --tasks 100"
chaos: install services
	$(PY) -m bench.chaos.run $(ARGS)

clean:
	rm -rf .demo .pytest_cache
