# The two commands of the README. Each sets up .venv on first use (about 2 minutes: torch and
# megatron-core from requirements.txt), then reuses it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt setup.py | cksum | cut -d' ' -f1)
NPROC ?= 8

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Main job: megatron-core MoE smoke run, TP=2 x PP=2 x EP=2 on 8 CPU ranks (stand-in for the
# demo training until the training entry point lands).
demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
		-m tools.mcore_smoke --config configs/runs/mcore_smoke.yaml $(ARGS)

# Test suite: everything but tests marked slow (those run with `make test ARGS=--run-slow`).
test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
