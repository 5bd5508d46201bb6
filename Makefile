# The README's two commands: `make demo` and `make test`. Both work on a fresh machine
# with Python 3.11, pip, make and apt: they create .venv, install phonefit into it and,
# when run as root, the Debian packages it uses (the Fashion-MNIST demo data, adb).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.phonefit-installed
DEBS   := dataset-fashion-mnist adb mksh toybox
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: install demo lint test test-fast debs clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

debs:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	else echo "not root: install the Debian packages $(DEBS) yourself if they are missing"; fi

install: $(STAMP) debs

demo: $(STAMP) debs
	$(PY) -m adapter.demo

# ruff (lint) and mypy over the tree, as configured in pyproject.toml; installs them into .venv if missing.
# `ruff format --check` is not run: the tree is not formatted yet ([tool.ruff.format] holds the settings).
lint: $(STAMP)
	@$(PY) -m ruff --version >/dev/null 2>&1 && $(PY) -m mypy --version >/dev/null 2>&1 \
	  || $(PY) -m pip install --quiet -e '.[lint]'
	$(PY) -m ruff check .
	$(PY) -m mypy

test: $(STAMP) debs
	$(PY) -m pytest -q

test-fast: $(STAMP) debs
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
