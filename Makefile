# One-command entry points. `make test` and `make demo` work on a fresh clone: they
# create .venv, install PyTorch (TORCH_SPEC, the CPU build on these machines) and the
# package with its dev extra, then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The verified offline datasets sit beside the checkout (../shared/data) on our
# machines and in CI; a value already in the environment wins.
export MICROCIRCUITS_DATA ?= $(abspath ../shared/data)
# The C++ step loops of the CPU kernel are built into the checkout (always writable; a
# value already in the environment, e.g. a shared cache, wins).
export MICROCIRCUITS_CACHE ?= $(abspath .cache)

.PHONY: setup test test-all demo lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# the C++ step loops of the CPU kernel: built once (about a minute), then cached
setup: $(BIN)/.installed
	$(BIN)/microcircuits build-native

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

demo: setup
	$(BIN)/microcircuits compare adding

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts examples

bench: setup
	$(BIN)/python -m benchmarks.rnn
	$(BIN)/python -m benchmarks.lm_step

clean:
	rm -rf $(VENV) .cache build dist src/*.egg-info .pytest_cache .ruff_cache
