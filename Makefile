# Two commands on a fresh machine:  make demo   |   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test demo clean

$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# one line per test as it finishes (name, PASSED, percent done: -v, without the -q of pyproject.toml);
# the 25 slowest tests at the end
test: $(STAMP)
	$(BIN)/python -m pytest tests -x -p no:cacheprovider -o addopts= -v --durations=25

demo: $(STAMP)
	$(BIN)/python -m dsv4 demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
