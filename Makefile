# Two commands on a fresh machine with Python 3.11 and make:
#   make serve   set up .venv, migrate the embedded SQLite database, serve http://127.0.0.1:8080/fhir
#   make test    set up .venv and run the test suite (PostgreSQL lane when FHIR_NORSE_TEST_POSTGRES_URL is set)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test migrate lint typecheck check content-check bench clean chromium node-deps debian-deps debian-test-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP) debian-deps
	FHIR_NORSE_MODE=$${FHIR_NORSE_MODE:-development} FHIR_NORSE_DEMO_ON_EMPTY=$${FHIR_NORSE_DEMO_ON_EMPTY:-1} \
	    $(BIN)/fhir-norse serve --host 127.0.0.1 --port 8080

migrate: $(STAMP)
	FHIR_NORSE_MODE=$${FHIR_NORSE_MODE:-development} $(BIN)/fhir-norse migrate

# Debian packages beyond Python (Pango and a font for the report's PDF; poppler-utils for the tests).
debian-deps:
	tools/ensure_debian_packages.sh serve

debian-test-deps:
	tools/ensure_debian_packages.sh test

# Debian's chromium for the browser tests (tests/web/), installed when missing.
chromium:
	tools/ensure_chromium.sh

# The npm packages of the SMART launch tests (tests/support/oidc/: oidc-provider, fhirclient).
node-deps:
	tools/ensure_node_deps.sh

# Test processes (pytest-xdist); each test file runs whole on one of them (its module fixtures: a browser,
# a server, an OpenID provider). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: $(STAMP) chromium node-deps debian-test-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy fhir_norse tests

# The gates CI runs before the tests: lint, formatting, strict types, and the layers of DESIGN.md.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fhir_norse tests tools
	$(BIN)/lint-imports

content-check: $(STAMP)
	$(BIN)/python -m tools.content_check $(if $(CONTENT_DIR),--content-dir $(CONTENT_DIR))

# Issue 14's comparison at full scale (1M Observations; starts sekmet-fhir and Medplum's router itself).
bench: $(STAMP)
	$(BIN)/python -m bench.run_all --issue14 --scale full

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
