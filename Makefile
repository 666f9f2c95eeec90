# Two commands on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PROM_DIR := $(VENV)/prometheus

.PHONY: install serve test lint bench clean prometheus

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the CPU wheel (a plain `torch` would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/prefix-serve $(ARGS)

test: $(STAMP) prometheus
	$(BIN)/pytest tests

# A real Prometheus for the dashboard test: Debian's package, unpacked under .venv (no service started).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || test -x $(PROM_DIR)/usr/bin/prometheus || \
	  ( mkdir -p $(PROM_DIR) && cd $(PROM_DIR) && \
	    { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } && \
	    dpkg -x prometheus_*.deb . && rm -f prometheus_*.deb ) || \
	  echo "note: could not install prometheus (apt-get download prometheus failed); its test will skip"

lint: $(STAMP)
	$(BIN)/ruff check server prefix_store clients tests bench docker
	$(BIN)/ruff format --check server prefix_store clients tests bench docker
	$(BIN)/mypy server prefix_store clients

bench: $(STAMP)
	$(BIN)/python bench/store_bench.py
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
