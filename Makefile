# Shopfloor: `make demo` runs the main job end to end, `make test` passes the suite.
# Both install what they need on a fresh Debian host (virtualenv, Python packages,
# docker.io, debootstrap, chromium, postgresql) and start the Docker daemon if none answers.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup engine image browser postgres demo stop test test-unit bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || bash scripts/ensure-packages.sh python3-venv python3-pip
	@command -v git >/dev/null || bash scripts/ensure-packages.sh git
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

engine:
	@bash scripts/ensure-engine.sh
	@bash scripts/ensure-packages.sh xfsprogs  # the disks' copy-on-write pool (snapshots, forks)

image: setup engine
	@bash scripts/ensure-packages.sh debootstrap
	$(BIN)/shopfloor image build

browser:
	@bash scripts/ensure-packages.sh chromium

postgres:
	@bash scripts/ensure-packages.sh postgresql

demo: setup engine browser image
	$(BIN)/python scripts/demo.py

stop:
	$(BIN)/python scripts/demo.py --stop

test: setup engine browser postgres image
	@bash scripts/ensure-packages.sh curl jq  # tests/integration/test_readme.py runs the README's examples
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/pytest -q tests/unit

bench: setup engine browser postgres image  # bench/lease.py runs on SQLite and on PostgreSQL
	@set -e; for bench in bench/*.py; do \
		case $$bench in */_*) continue;; esac; \
		echo "== $$bench"; $(BIN)/python $$bench; done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy controller agents evidence
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  # the demo's controller and machines, then .demo/
	@if [ -x $(BIN)/python ]; then $(BIN)/python scripts/demo.py --clean; fi
	rm -rf .demo
