# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
export FEDFER_ASSETS ?= $(SHARED)

.PHONY: setup system-deps demo test lint links protos

$(BIN)/activate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[agent,dev]"
	touch $(BIN)/activate

# mypy cannot follow the editable install's package-dir mapping (fedfer.agent -> agent/, ...): give it the
# same tree as symbolic links in .venv/fedfer-src (pyproject.toml's [tool.mypy] mypy_path).
links: setup
	@$(BIN)/python -c "$$LINK_TREE"

define LINK_TREE
import os, pathlib, tomllib
mapping = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
root = pathlib.Path("$(VENV)", "fedfer-src")
for package, folder in mapping.items():
    link = root.joinpath(*package.split("."))
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(folder, link.parent), target_is_directory=True)
endef
export LINK_TREE

# PostgreSQL (for the storage contract tests) and systemd-analyze (unit checks) on a fresh Debian machine.
system-deps:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)
	@command -v systemd-analyze >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null)

setup: $(BIN)/activate

demo: setup
	$(BIN)/python -m fedfer.bench.demo $(DEMO_ARGS)

lint: setup links
	$(BIN)/ruff check .
	$(BIN)/mypy --strict

protos: setup
	$(BIN)/python protos/generate.py

test: setup system-deps lint
	$(BIN)/python -m pytest -q tests
