"""Where a call runs. CUDA tensors -> the Triton kernels. CPU tensors -> the Triton kernels under the
interpreter when TRITON_INTERPRET=1 is set at call time, else the registered op's CPU kernel (the
extension's C++ kernel when it defines one, else the torch reference; see me_kernels._ops).

The public functions launch the Triton kernels directly when `eager()` and `use_triton(device)`
(no dispatcher overhead on a decode step, and the interpreter tests exercise the kernels);
otherwise, and always under torch.compile, they call the registered op torch.ops.me.<op>.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["use_triton", "eager", "on_device"]


@triton.jit
def _probe():  # defined like every kernel of the package: tells how triton.jit was configured
    pass


_KERNELS_INTERPRETED = isinstance(_probe, InterpretedFunction)


def use_triton(device: torch.device) -> bool:
    """Whether tensors on `device` run the Triton kernels (CUDA, or the CPU under the interpreter).
    Raises when TRITON_INTERPRET at call time disagrees with how the kernels were defined."""
    if device.type == "cuda":
        if _KERNELS_INTERPRETED:
            raise RuntimeError(
                "me_kernels was imported with TRITON_INTERPRET=1, so its kernels are interpreted and "
                "cannot run on CUDA tensors; unset TRITON_INTERPRET before importing me_kernels."
            )
        return True
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        if not _KERNELS_INTERPRETED:
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set but me_kernels was imported without it: set it before "
                "importing me_kernels (Triton reads it when the kernels are defined)."
            )
        return True
    return False


def eager() -> bool:
    """True when the public functions may launch their Triton kernel directly instead of going
    through the registered torch op (saves the dispatcher's overhead on every decode step);
    under torch.compile the registered op is used so the call is traceable."""
    return not torch.compiler.is_compiling()


def on_device(device: torch.device):
    """Context for a kernel launch: Triton launches on the *current* CUDA device and stream, not
    on the tensors' device, so a launch on tensors of another GPU must make theirs current."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
