# The two commands of the quick start. Each bootstraps what is missing first (scripts/bootstrap.sh).
PY := .venv/bin/python
ARGS ?=

.PHONY: run test test-fast lint bootstrap results

bootstrap:
	bash scripts/bootstrap.sh

run: bootstrap
	$(PY) -m experiments.run projector=attention $(ARGS)

# Two xdist workers, each test module in one of them (its module-scoped engines start once;
# cache entries both need are built once: checkpoint.cache_lock); --durations=25: the slowest tests are listed in every run (and so in every CI log)
TEST_WORKERS ?= 2
test: bootstrap
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 $(ARGS)

test-fast: bootstrap
	$(PY) -m pytest -m "not engine and not slow" $(ARGS)

lint: bootstrap
	$(PY) -m ruff check .

# every number the README quotes, regenerated on this machine (hours on CPU; ARGS="names=[fork,cache]" for some)
results: bootstrap
	$(PY) -m experiments.results $(ARGS)
