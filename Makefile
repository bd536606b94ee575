# optbrain: `make demo` runs the main job, `make test` runs the tests. Both set themselves up.
VENV ?= .venv
export OMP_WAIT_POLICY ?= PASSIVE
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench clean

$(STAMP): pyproject.toml scripts/install_zoo.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	PY=$(PY) bash scripts/install_zoo.sh
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m optbrain demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: setup
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
