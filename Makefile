# The two commands of the README. Each sets up .venv on first use (about 2 minutes: torch and
# megatron-core from requirements.txt), then reuses it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt setup.py | cksum | cut -d' ' -f1)
NPROC ?= 4

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Main job: write the demo dataset (once), train the tiny Uni-Perceiver-MoE of
# configs/runs/demo.yaml on NPROC CPU ranks (TP=2 x EP=2), then evaluate it zero-shot.
# A second call resumes from runs/demo (nothing left to train) and re-evaluates; rm -rf runs/demo
# to train again. ARGS are dotted config overrides for both commands.
demo: $(STAMP)
	test -f data/demo/demo.json || $(PY) -m tools.make_demo_data --out data/demo
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
		-m megatron_uni.train --config configs/runs/demo.yaml $(ARGS)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
		-m megatron_uni.evaluate --config configs/runs/demo.yaml \
		checkpoint.load=runs/demo/checkpoints $(ARGS)

# Test suite: everything but tests marked slow (those run with `make test ARGS=--run-slow`).
test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
