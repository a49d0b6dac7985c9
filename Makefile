# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
export FEDFER_ASSETS ?= $(SHARED)

.PHONY: setup system-deps demo test lint typecheck protos

$(BIN)/activate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[agent,dev]"
	touch $(BIN)/activate

# PostgreSQL (for the storage contract tests) and systemd-analyze (unit checks) on a fresh Debian machine.
system-deps:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)
	@command -v systemd-analyze >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null)

setup: $(BIN)/activate

demo: setup
	$(BIN)/python -m agent.demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy --strict security aggregator agent bench

protos: setup
	$(BIN)/python -m protos.generate

test: setup system-deps lint
	$(BIN)/python -m pytest -q tests
