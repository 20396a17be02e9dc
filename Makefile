# Two set-up commands (README): `make run` runs the default study, `make test` runs the tests.
# Both create the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-slow test-gpu lint bench mutation clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision pinned to releases that exist offline on our machines; see README.
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/qkvprobe run

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	# Type check: --strict's checks on rules/, features/ and protocols/ ([tool.mypy] in pyproject.toml).
	$(BIN)/mypy
	# The import graph: no cycle, every import down the README's layers (tests/test_layers.py).
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layers.py

# Mutation score of one science-core module (docs/testing.md); long, not in CI. MODULE is a path under
# src/qkvprobe (a file or a folder). Two workers (a 2-core machine), niced; each mutant runs only the tests that
# reach its function. Results: `$(BIN)/mutmut results`, `$(BIN)/mutmut show NAME`.
MODULE ?= protocols/metrics.py
MUTANTS = qkvprobe.$(subst /,.,$(patsubst %/,%,$(MODULE:.py=))).*
mutation: $(STAMP)
	# mutants/src must exist when Python starts, or its import cache skips that PYTHONPATH entry for good.
	mkdir -p mutants/src
	PYTHONPATH=$(CURDIR)/mutants/src nice -n 10 $(BIN)/mutmut run --max-children 2 "$(MUTANTS)"
	$(BIN)/mutmut results | grep -F "$(subst *,,$(MUTANTS))" || true

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_rules.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .mypy_cache mutants
