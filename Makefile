# One entry point for humans and CI. `make demo` and `make ci` work on a fresh CPU machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo demo-members test cuda-check bench-cpu ci gpu-suite clean

# CPU torch only when no torch is installed (never pulls a CUDA build), then the package with
# its compiled extension, built against that torch.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -c .ci/constraints.txt setuptools wheel ninja pybind11
	$(PIP) install -c .ci/constraints.txt --no-build-isolation -e ".[test,bench,eval,ray,multigpu]"

# The main job on the embedded default: ME over the two demo members shipped in the package.
demo: setup
	$(PYTHON) -m me_runtime.cli --compare   # = the me-generate console script

# Rebuild the demo members from their sources and re-evaluate them (repository scripts, not
# installed; ~20 min on CPU; needs PyPI and Debian's package mirror). Not part of ci.
demo-members:
	nice $(PYTHON) -m scripts.demo.train --out me_runtime/demo/members --seed 0
	nice $(PYTHON) -m scripts.demo.train --out me_runtime/demo/members --seed 0 --members blend \
		--tokenizer metaspace --vocab-size 3072 --threads 1
	$(PYTHON) -m scripts.demo.evaluate --samples 60 --write me_runtime/demo/EVAL.md

# The test suite as CI runs it: Triton kernels on CPU tensors under the interpreter.
test:
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests

# Every CUDA source compiles for sm_90a (nvcc, compile only) and the CUDA dispatch layer
# compiles against torch's headers.
cuda-check:
	.ci/check_cuda_sources.sh

# The end-to-end benchmark in its CPU mode, its plot and summary, so the benchmark code cannot rot.
bench-cpu:
	$(PYTHON) bench/e2e.py --cpu --repeats 1 --new-tokens 16 --out bench/out/cpu/e2e.json
	$(PYTHON) bench/plot.py bench/out/cpu
	$(PYTHON) bench/summarize.py bench/out/cpu

ci: setup cuda-check test bench-cpu

# On a GPU machine with torch/triton/transformers preinstalled and no network.
gpu-suite:
	bench/gpu_suite.sh bench/out/gpu

clean:
	rm -rf build *.egg-info me_kernels/_C*.so bench/out .pytest_cache
