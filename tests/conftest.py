"""Shared test configuration.

* `gpu` tests need CUDA: they are skipped at run time (never at collection: collecting tests
  must not touch a GPU) when torch has no usable CUDA device.
* Triton kernels are tested on CPU tensors under the interpreter: run with TRITON_INTERPRET=1
  (`make test` and CI do). `kernel_devices()` lists the devices a kernel test should run on.
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests work on tiny tensors, where OpenMP's thread hand-offs cost more than they save (and
# make timings swing wildly on a loaded 2-core machine).
torch.set_num_threads(1)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def kernel_devices():
    """Parameters for tests that must run the Triton kernels: the CPU under the interpreter
    (skipped with a reason when TRITON_INTERPRET is not 1) and CUDA (marked `gpu`)."""
    cpu = pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1"),
        id="cpu-interpret",
    )
    return [cpu, pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


@pytest.fixture(params=kernel_devices())
def kernel_device(request):
    """Device on which a test exercises the Triton kernels (not the torch reference path)."""
    return torch.device(request.param)
