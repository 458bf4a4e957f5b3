# tts-daemon — see README.md. Every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= conf/daemon.toml
STAMP  := $(VENV)/.installed
# make stress: both architectures, same load and seed; figures and plot under var/.
STRESS_ARGS ?= --compare --json var/stress.json --plot var/stress.png

.PHONY: install run test lint format stress bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tts-daemon needs Python 3.11+")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,tools]'
	touch $(STAMP)

install: $(STAMP)

# exec so that Ctrl-C reaches the daemon directly and its exit status is make's.
run: $(STAMP)
	exec $(BIN)/tts-daemon run --config $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup --basetemp=.pytest-tmp $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

stress: $(STAMP)
	mkdir -p var
	$(BIN)/python tools/stress.py $(STRESS_ARGS)

bench: $(STAMP)
	$(BIN)/python tools/bench_billing.py
	$(BIN)/python tools/bench_hot.py
	$(BIN)/python tools/bench_gateway.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
