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

.PHONY: demo test bench env clean peer-check peer-env

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
# The rest runs on two workers (a test file stays on one): most of its time is single-threaded
# imports and CLI subprocesses, so two cores do about twice the work.
RAY_SUITES := tests/test_ray_cluster.py tests/chaos tests/test_integrations.py tests/test_hub_fetch.py
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests $(addprefix --ignore=,$(RAY_SUITES))
	set -e; for suite in $(RAY_SUITES); do $(BIN)/python -m pytest -q $$suite; done

# LLaMA-Factory itself, in a venv of its own pins (CPU torch first; torchaudio is a stub: it is
# imported only for audio inputs), then compared with loadgraph on its own example YAMLs.
LF_VENV ?= /work/venvs/llamafactory
LF_VERSION ?= 0.9.5
$(LF_VENV)/.installed-$(LF_VERSION):
	$(PY) -m venv $(LF_VENV)
	$(LF_VENV)/bin/pip install -q torch==2.13.0
	$(LF_VENV)/bin/pip install -q llamafactory==$(LF_VERSION)
	# llamafactory pulls torch/torchvision/torchaudio builds for CUDA: put the CPU torch back.
	$(LF_VENV)/bin/pip uninstall -y -q torchvision torchaudio triton $$($(LF_VENV)/bin/pip list 2>/dev/null | awk '/^(nvidia-|cuda-)/{print $$1}')
	$(LF_VENV)/bin/pip install -q torch==2.13.0
	sp=$$($(LF_VENV)/bin/python -c "import site; print(site.getsitepackages()[0])"); mkdir -p $$sp/torchaudio; \
	  echo '__version__ = "0.0.0+stub"  # LLaMA-Factory imports torchaudio only for audio' > $$sp/torchaudio/__init__.py
	touch $@
# What the example YAMLs ask LLaMA-Factory for (bitsandbytes for QLoRA/QOFT, the optimizers' packages,
# nlg_eval's metrics); --no-deps where a package would pull a CUDA torch. No CPU torchvision exists on
# PyPI for this torch, so LLaMA-Factory cannot load a Qwen-VL processor here (lf_export_check says so).
$(LF_VENV)/.extras-$(LF_VERSION): $(LF_VENV)/.installed-$(LF_VERSION)
	$(LF_VENV)/bin/pip install -q --no-deps bitsandbytes==0.50.2 badam==1.4 adam-mini==1.1.1 apollo-torch==1.0.3 galore-torch==1.0
	$(LF_VENV)/bin/pip install -q jieba nltk rouge-chinese
	touch $@

peer-env: $(LF_VENV)/.extras-$(LF_VERSION)

peer-check: $(STAMP) peer-env
	$(LF_VENV)/bin/python tests/peers/lf_keys.py | diff - tests/peers/llamafactory-keys.tsv
	rm -rf .peer-check && $(BIN)/python tests/peers/lf_export_check.py $(LF_VENV)/bin/llamafactory-cli .peer-check/export
	$(BIN)/python tests/peers/lf_load_check.py $(LF_VENV)/bin/python .peer-check/load

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .demo

# LLaVA's real builder (llava-torch, transformers 4.37.2, peft 0.10.0) in its own venv against
# load_pretrained_model on fixtures in LLaVA's on-disk format. Not part of `make test`.
LLAVA_VENV ?= /work/venvs/llava
.PHONY: llava-check
$(LLAVA_VENV)/.installed:
	$(PY) -m venv $(LLAVA_VENV)
	$(LLAVA_VENV)/bin/pip install -q torch==2.13.0 setuptools wheel
	$(LLAVA_VENV)/bin/pip install -q transformers==4.37.2 tokenizers==0.15.1 peft==0.10.0 accelerate==0.27.2 sentencepiece pillow 'numpy<2' protobuf
	# llava-torch pins torch 2.1 and friends: its code runs on the versions above.
	$(LLAVA_VENV)/bin/pip install -q --no-deps llava-torch
	touch $@
llava-check: $(STAMP) $(LLAVA_VENV)/.installed
	LLAVA_PY=$(LLAVA_VENV)/bin/python PYTHONPATH=$(CURDIR) $(BIN)/python -W ignore tests/llava_peer/check.py
