# Two commands on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PROM_DIR := $(VENV)/prometheus
HAPROXY_DIR := $(VENV)/haproxy

.PHONY: install serve test lint bench clean prometheus haproxy cluster gpu-check

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

test: $(STAMP) prometheus haproxy
	$(BIN)/pytest tests

# A real Prometheus for the dashboard test: Debian's package, unpacked under .venv (no service started).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || test -x $(PROM_DIR)/usr/bin/prometheus || \
	  ( mkdir -p $(PROM_DIR) && cd $(PROM_DIR) && \
	    { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } && \
	    dpkg -x prometheus_*.deb . && rm -f prometheus_*.deb ) || \
	  echo "note: could not install prometheus (apt-get download prometheus failed); its test will skip"

# HAProxy for `prefix-cluster` and its tests: Debian's package and the libraries it links that a
# slim system lacks (Lua, OpenTracing), unpacked under .venv (no service started, nothing installed).
haproxy:
	@command -v haproxy >/dev/null 2>&1 || test -x $(HAPROXY_DIR)/usr/sbin/haproxy || \
	  ( mkdir -p $(HAPROXY_DIR) && cd $(HAPROXY_DIR) && \
	    { apt-get download haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1 >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && \
	        apt-get download haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1 >/dev/null 2>&1; }; } && \
	    for deb in *.deb; do dpkg -x $$deb . || exit 1; done && rm -f *.deb ) || \
	  echo "note: could not install haproxy (apt-get download haproxy failed); the cluster tests will skip"

# One box, N replicas behind HAProxy: make cluster ARGS="--replicas 3 --port 8080"
cluster: $(STAMP) haproxy
	$(BIN)/prefix-cluster $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check server prefix_store infra prefix_cluster clients trainer examples tests bench docker
	$(BIN)/ruff format --check server prefix_store infra prefix_cluster clients trainer examples tests bench docker
	$(BIN)/mypy server prefix_store infra prefix_cluster clients trainer

bench: $(STAMP)
	$(BIN)/python bench/store_bench.py
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/throughput.py --dtype bfloat16

# On a machine with a CUDA GPU (at most 8 minutes): the oracle on CUDA in fp32 and bf16, and the
# throughput bench in bf16 on a Llama-1B shape; writes bench/results/gpu.json and docs/benchmarks.md.
# Needs a CUDA build of torch in .venv (the pinned CPU wheel sees no GPU); exits 1 if the oracle fails.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Three prefix tasks trained on the demo model, uploaded, 60 held-out inputs answered in one mixed
# batch; prints per task how many had their values copied into the answer (a few minutes).
.PHONY: demo
demo: $(STAMP)
	$(BIN)/python -m examples.table_to_text.demo

# The image built and run for real with podman (installed from apt if missing): health, non-root,
# same tokens as prefix-serve outside it, drain on stop, a volume across restarts, external Redis.
# Several minutes (the image build); leaves nothing behind. See docker/image_test.py.
.PHONY: image-test
image-test: $(STAMP)
	$(BIN)/python -B docker/image_test.py  # -B: no __pycache__ in the checkout
