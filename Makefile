# The two commands of the README: `make demo` and `make test`. Each creates
# the virtual environment, installs the project and the system packages it
# needs when they are missing, then runs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TRIAL_ARGS ?= tests

.PHONY: demo test lint typecheck bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml scripts/system-deps
	PYTHON=$(PYTHON) scripts/system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Twisted finds plugins in the twisted/plugins folders of sys.path's
	# entries (this one has no __init__.py, on purpose): put the checkout
	# itself on sys.path so that `twist` sees ours and their edits.
	$(BIN)/python -c 'import pathlib, site; pathlib.Path(site.getsitepackages()[0], "cpsdmp-checkout.pth").write_text("$(CURDIR)\n")'
	touch $@

demo: install
	$(BIN)/cpsdmp demo

test: install
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS)

lint: install
	$(BIN)/ruff check cpsdmp tests benchmarks twisted
	$(BIN)/ruff format --check cpsdmp tests benchmarks twisted

typecheck: install
	$(BIN)/mypy cpsdmp

# Benchmarks print their figures; each README in benchmarks/ says how to read
# them. They are never part of `make test`.
bench: install
	$(BIN)/python benchmarks/agent/bench.py
	$(BIN)/python benchmarks/tls/bench.py
	$(BIN)/python benchmarks/xds/bench.py
	$(BIN)/python benchmarks/e2e/bench.py --latency 50 --total 200 --concurrency 8

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* twisted/plugins/dropin.cache
