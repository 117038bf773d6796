# Each target installs what it needs into .venv first, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 install from local disk on the development machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP := $(PY) -m pip --disable-pip-version-check --no-input
# pip warns about every absent local index folder; keep the real messages visible.
QUIET := 2>&1 | grep -v "^WARNING: Location" || true

.PHONY: quickstart test test-fast test-long bench lint format clean

# uv installs the same pins as pip faster (torch and all, bytecode compiled: 1 min against
# 2.5 min on a 2-core development machine). uv does not read pip's configuration, so pip's find-links,
# indexes and constraints (the local torch wheels here) are handed to it. When uv cannot be
# had or fails, pip installs instead. --compile-bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set (as here), every Ray worker would otherwise compile torch,
# ray and pyarrow from source at each start, which made the test suite twice as slow.
pip_config = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$(1)='\(.*\)'$$/\1/p" | head -1)
UV_PIP = $(VENV)/bin/uv pip install --quiet --python $(PY) --index-strategy unsafe-best-match --compile-bytecode \
	$(foreach v,$(call pip_config,index-url),--index-url $(v)) \
	$(foreach v,$(call pip_config,extra-index-url),--extra-index-url $(v)) \
	$(foreach v,$(call pip_config,find-links),--find-links $(v)) \
	$(foreach v,$(call pip_config,constraint),--constraint $(v))

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q uv $(QUIET)
	$(UV_PIP) $(TORCH_SPEC) -e '.[test]' || $(PIP) install -q $(TORCH_SPEC) -e '.[test]' $(QUIET)
	$(PY) -c "import ray, torch, timm, faiss, peft, fastapi"
	touch $@

quickstart: $(VENV)/.installed
	$(VENV)/bin/repforge quickstart

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not long"

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not long"

# The cases too long for make test's budget (a real PBT sweep: 3-4 minutes here).
test-long: $(VENV)/.installed
	$(PY) -m pytest -q -m long

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[test,bench]' $(QUIET)
	touch $@

bench: $(VENV)/.bench-installed
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs .pytest_cache
