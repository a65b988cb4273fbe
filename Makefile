# vitopt: `make demo` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitopt-installed
DEMO_OUT ?= out/digits-vit.vitopt

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/vitopt compile builtin:digits-vit --target cpu --preset lossless \
		--eval builtin:digits --max-batch 64 --bench-batch 1,64 -o $(DEMO_OUT)
	$(VENV)/bin/vitopt inspect $(DEMO_OUT)

# Two workers (pytest-xdist) on the 2-core CI machine keep the suite under 15 minutes; work
# stealing keeps both busy to the end (a few tests take a minute or more).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

clean:
	rm -rf out
