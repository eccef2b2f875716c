# Two commands on a fresh machine: `make demo` and `make test`. Both build their own venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench env clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch first (on this machine's disk): an unpinned torch pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0 setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	# deepspeed is an sdist whose isolated build would pull a CUDA torch: build it against ours.
	$(BIN)/pip install -q --no-build-isolation 'deepspeed>=0.15'
	touch $@

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m loadgraph.demo

# Suites that start their own Ray cluster run in their own pytest process: one Ray per process.
RAY_SUITES := tests/test_ray_cluster.py tests/chaos tests/test_integrations.py
test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(addprefix --ignore=,$(RAY_SUITES))
	set -e; for suite in $(RAY_SUITES); do $(BIN)/python -m pytest -q $$suite; done

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .demo
