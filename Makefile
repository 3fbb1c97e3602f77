# One command each: `make demo` runs the gateway's main job on embedded defaults (tools/),
# `make test` runs lint, type checks and the test suite. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench soak geo clean run lock

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tools demo

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check gateway tools tests $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy --strict gateway tools

pytest: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run

soak: $(STAMP)
	$(BIN)/python -m bench.soak

geo: $(STAMP)
	$(BIN)/python -m tools geo-build

run: $(STAMP)
	$(BIN)/gateway run --config config/gateway.yaml

# Hash-pinned runtime dependencies for the container image (pip-tools, installed in .venv only).
# Pins already in the lock files are kept; `make lock LOCK_FLAGS=--upgrade` moves them all on.
LOCK_FLAGS ?=
PIP_COMPILE = $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links --build-deps-for wheel $(LOCK_FLAGS)

lock: $(STAMP)
	$(BIN)/python -m pip install -q 'pip-tools>=7.4'
	$(PIP_COMPILE) --output-file requirements.lock pyproject.toml
	$(PIP_COMPILE) --extra demo --extra geo-build --constraint requirements.lock \
		--output-file requirements-demo.lock pyproject.toml

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
