# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install what is needed, on a machine with
# only Python 3.11, pip and root apt-get.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bmetrack-installed
DEMO_DIR ?= demo-output
# Debian packages the report needs (WeasyPrint), and those only the test suite needs
# (PostgreSQL, dciodvfy, headless Chromium, Orthanc with DICOMweb).
APT_RUNTIME := libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz0b fonts-dejavu-core
APT_TEST := postgresql dicom3tools chromium orthanc orthanc-dicomweb

.PHONY: demo test lint typecheck unit system-deps test-deps apt-install benchmark clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

system-deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_RUNTIME)"

test-deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_RUNTIME) $(APT_TEST)"

apt-install:
	@missing=""; for p in $(PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "Missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

demo: system-deps $(STAMP)
	$(BIN)/bmetrack demo --out $(DEMO_DIR)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: test-deps $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile --timeout 900

test: lint typecheck unit

benchmark: system-deps $(STAMP)
	$(BIN)/python benchmarks/analysis_scale.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
