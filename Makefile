# pacs-ai-node: `make serve` runs the node, `make test` runs every check. Both bootstrap .venv themselves.
PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
DEMODEPS := $(VENV)/.installed-demo
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: serve test test-pg demo lint typecheck sysdeps bench bench-e2e venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(TESTDEPS): pyproject.toml $(RUNTIME)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(DEMODEPS): pyproject.toml $(RUNTIME)
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

venv: $(TESTDEPS)

serve: $(RUNTIME)
	$(BIN)/pacsnode serve $(if $(CONFIG),--config $(CONFIG))

sysdeps:
	@scripts/sysdeps.sh

demo: $(DEMODEPS) sysdeps
	$(BIN)/pacsnode demo $(DEMO_ARGS)

lint: $(TESTDEPS)
	$(BIN)/ruff check node models training demo peers tests benchmarks

typecheck: $(TESTDEPS)
	$(BIN)/mypy node models training demo peers

test: $(TESTDEPS) sysdeps lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

# The integration suite again with every node on a fresh database of one throwaway PostgreSQL cluster
# (tests/conftest.py `node_database`; the same as TEST_NODE_DB=postgres). Not part of `make test`: see README "Tests".
test-pg: $(TESTDEPS) sysdeps
	$(BIN)/pytest --node-db=postgres tests/integration $(PYTEST_ARGS)

bench: $(TESTDEPS) sysdeps
	$(BIN)/python -m benchmarks.ingest
	$(BIN)/python -m benchmarks.claims

bench-e2e: $(TESTDEPS) sysdeps
	$(BIN)/python -m benchmarks.e2e_latency

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
