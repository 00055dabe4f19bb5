"""Loading of the compiled extension me_kernels._C and the `torch.ops.me` namespace.

`torch.ops.me.group_rows` and `torch.ops.me.grouped_linear` always exist after this module is
imported: from the extension when it is built, else defined here in Python with the torch
reference implementations (one warning, on first use). A broken build (an ABI mismatch such as
"undefined symbol", or a missing shared library) is raised, never hidden behind the fallback.
Fake implementations are registered here for both cases, so torch.compile can trace the ops.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import reference

__all__ = ["EXTENSION_LOADED", "extension_error", "warn_fallback_once", "compiled_op", "register_python_op"]


def _load_extension() -> tuple[bool, str | None]:
    if os.environ.get("ME_DISABLE_EXT", "0") == "1":
        return False, "disabled by ME_DISABLE_EXT=1"
    try:
        importlib.import_module("me_kernels._C")
        return True, None
    except ModuleNotFoundError as err:
        if err.name != "me_kernels._C":
            raise
        return False, "me_kernels._C is not built (installed with ME_SKIP_EXT=1, or not compiled in place)"
    except ImportError as err:
        raise ImportError(
            f"me_kernels._C exists but failed to load: {err}. It was most likely built against a "
            f"different torch than the installed {torch.__version__}; rebuild it with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)."
        ) from err


EXTENSION_LOADED, extension_error = _load_extension()
_warned = False


def warn_fallback_once() -> None:
    """Warn (once per process) that a compiled op is running its torch fallback."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"me_kernels: compiled extension unavailable ({extension_error}); torch.ops.me.* run "
            "their torch reference implementations (slower on GPU).",
            RuntimeWarning,
            stacklevel=3,
        )


if not EXTENSION_LOADED:
    # Same schemas as csrc/bindings.cpp, so callers of torch.ops.me.* need no special case.
    _lib = torch.library.Library("me", "DEF")
    _lib.define("group_rows(Tensor members, int num_members) -> (Tensor order, Tensor offsets)")
    _lib.define("grouped_linear(Tensor x, Tensor members, Tensor weight, Tensor? bias=None) -> Tensor")

    def _check_cpu_ids(members, num_members, op):
        # Like the compiled CPU op: reading a CPU tensor costs no sync, so bad ids raise. (On
        # CUDA nothing is checked on the host; such rows come out last / as NaN.)
        if members.device.type == "cpu" and members.numel():
            bad = (members < 0) | (members >= num_members)
            if bool(bad.any()):
                t = int(bad.nonzero()[0, 0])
                raise ValueError(f"{op}: members[{t}] = {int(members[t])} is outside [0, num_members={num_members})")

    def _group_rows_fallback(members, num_members):
        warn_fallback_once()
        _check_cpu_ids(members, num_members, "group_rows")
        return reference.group_rows_reference(members, num_members)

    def _grouped_linear_fallback(x, members, weight, bias=None):
        warn_fallback_once()
        _check_cpu_ids(members, weight.shape[0], "grouped_linear")
        return reference.grouped_linear_reference(x, members, weight, bias)

    _lib.impl("group_rows", _group_rows_fallback, "CompositeExplicitAutograd")
    _lib.impl("grouped_linear", _grouped_linear_fallback, "CompositeExplicitAutograd")


@torch.library.register_fake("me::group_rows")
def _group_rows_fake(members, num_members):
    return members.new_empty(members.shape), members.new_empty((num_members + 1,))


@torch.library.register_fake("me::grouped_linear")
def _grouped_linear_fake(x, members, weight, bias=None):
    return x.new_empty((x.shape[0], weight.shape[1]))


# TEMP registration shim (to be replaced by the registration restructure): the extension may
# define the sampling / selection / mixture ops with CPU kernels; then Python only adds the CUDA
# (Triton) kernel and the fake, otherwise it defines the op itself as before.
def compiled_op(name: str) -> bool:
    """True when me_kernels._C defines me::<name> (with its CPU kernel)."""
    if not EXTENSION_LOADED:
        return False
    try:
        torch._C._dispatch_find_schema_or_throw(f"me::{name}", "")
    except RuntimeError:
        return False
    return True


def register_python_op(name: str, impl, fake):
    """Registers `impl` (Triton on CUDA, interpreter / reference on CPU) and `fake` for me::<name>."""
    if compiled_op(name):
        torch.library.register_kernel(f"me::{name}", "cuda", impl)
        torch.library.register_fake(f"me::{name}")(fake)
        return
    op = torch.library.custom_op(f"me::{name}", impl, mutates_args=())
    op.register_fake(fake)
