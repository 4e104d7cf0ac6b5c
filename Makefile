# saliency-serve: `make serve` and `make test` work on a fresh machine with Python 3.11
# and Java 17; everything else is installed from the package registries by these rules.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Every pip call sees this file: nothing may pull another torch than 2.13.0.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# The default model's training cache and the archives live in the checkout.
export SALIENCY_SERVE_CACHE ?= $(CURDIR)/.cache/saliency-serve
MODEL_STORE ?= model_store
PYTEST_ARGS ?=

.PHONY: serve test lint protos bench archive install java browser screenshot clean help
help:
	@echo "make serve   - install, build the default model archive once, start TorchServe + gateway"
	@echo "make test    - install and run the whole suite (lint, protos, unit, integration, deploy)"
	@echo "make bench   - speed and quality benchmarks, written to bench/results/"
	@echo "make protos  - regenerate service/_proto from protos/ and the method registry"
	@echo "make screenshot - docs/web-page.png from the web page's browser test"

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e '.[server,dev]'
	touch $@

install: $(VENV)/.installed java

# TorchServe 0.12 runs on Java 17; install the headless JRE where it is missing.
java:
	@java -version 2>&1 | grep -q 'version "17' || { \
	  echo "installing OpenJDK 17 (TorchServe needs it)"; \
	  (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless) >/dev/null; }

# The web page's tests drive Debian's Chromium (Playwright's own browser download is not
# reachable everywhere); install it where it is missing. The tests fail without it.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  echo "installing Chromium (the web page's browser tests need it)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null; }

# docs/web-page.png, the README's picture of the page, taken by its browser test.
screenshot: install browser
	SALIENCY_WEB_SCREENSHOT=$(CURDIR)/docs/web-page.png $(BIN)/pytest -q \
	  tests/integration/test_web.py -k redraws_the_mask

# The CLI rebuilds the archive only when absent or when the trained model changed.
archive: $(VENV)/.installed
	$(BIN)/saliency-serve archive --default --out $(MODEL_STORE)

serve: install
	$(BIN)/saliency-serve serve --model-store $(MODEL_STORE)

protos: $(VENV)/.installed
	$(BIN)/python -m service.protogen

lint: $(VENV)/.installed
	$(BIN)/ruff check --no-cache service handlers tests bench
	$(BIN)/ruff format --check --no-cache service handlers tests bench
	$(BIN)/mypy service handlers
	$(BIN)/python -m service.protogen --check

test: install browser deploy-tools
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .venv-tools .cache $(MODEL_STORE)

include deploy/tools.mk
