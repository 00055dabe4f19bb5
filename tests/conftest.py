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


@pytest.fixture
def eager_cuda_graphs(monkeypatch):
    """The stacked engine's CUDA-graph path on the CPU: CUDA graphs cannot run here, so a "graph"
    replays the captured call eagerly on its static buffers, and shapes are bucketed to powers of
    two as on CUDA. That checks the graph path's own logic: bucketed shapes, padded no-op rows,
    static input buffers reused across steps, caches and graphs kept across generate calls (reused,
    zeroed) and rows retiring mid-call. Set `engine.cuda_graphs = True` on a stacked engine."""
    import me_runtime.stacked_engine as stacked_engine_module

    monkeypatch.setattr(stacked_engine_module, "_bucket", lambda n, device: 1 if n <= 1 else 1 << (n - 1).bit_length())

    class EagerGraph:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            result = self.fn()
            if self.out is not None:
                self.out.copy_(result)

    def capture(self, rows, q, kv_len, logits, device):
        static = (torch.zeros((rows, q), dtype=torch.long),) + tuple(torch.zeros(rows, dtype=torch.long) for _ in range(4))
        fn = lambda: self.group.forward(self.cache, *static, kv_len=kv_len, logits=logits)  # noqa: E731
        out = fn()  # the "graph's" output buffer, rewritten by every replay
        return EagerGraph(fn, out), static, out

    monkeypatch.setattr(stacked_engine_module.GraphedForward, "_capture", capture)


@pytest.fixture
def compiled_cpu_kernels(monkeypatch, request):
    """Runtime tests (modules with `pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")`)
    run the compiled CPU ops (TRITON_INTERPRET=0): thousands of rows and vocabularies of thousands
    are far too much for the Triton interpreter, and the kernels are tested on their own. A test
    marked `triton_kernels` keeps CI's interpreter, to run the runtime on the Triton kernels."""
    if request.node.get_closest_marker("triton_kernels") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
