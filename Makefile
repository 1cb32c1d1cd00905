# pacs-ai-node: `make serve` runs the node, `make test` runs every check. Both bootstrap .venv themselves.
PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
DEMODEPS := $(VENV)/.installed-demo
PYTEST_ARGS ?=
# `make test`: three pytest-xdist workers on the two cores (most integration time is waiting on peers; with two, a
# third of the CPU sat idle: README "Tests"), whole files per worker
# (test_routing_senders' module node runs its tests in order), every node-starting integration test on SQLite and on
# PostgreSQL (tests/conftest.py `--node-db=both`; tests marked one_backend on PostgreSQL only). TEST_WORKERS=0 runs
# serially. The 30 slowest tests are printed at the end: the suite must stay under 15 minutes on 2 cores.
TEST_WORKERS ?= 3
TEST_RUN := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) --node-db=both --durations=30
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
	$(BIN)/pytest $(TEST_RUN) $(PYTEST_ARGS)

# The integration suite on PostgreSQL alone (tests/conftest.py `node_database`; the same as TEST_NODE_DB=postgres),
# for chasing a PostgreSQL-only failure; `make test` already runs it on both backends.
test-pg: $(TESTDEPS) sysdeps
	$(BIN)/pytest --node-db=postgres tests/integration $(PYTEST_ARGS)

bench: $(TESTDEPS) sysdeps
	$(BIN)/python -m benchmarks.ingest
	$(BIN)/python -m benchmarks.claims

bench-e2e: $(TESTDEPS) sysdeps
	$(BIN)/python -m benchmarks.e2e_latency

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
