"""Loading of the compiled extension me_kernels._C (a leaf module: it imports nothing from the package).

`EXTENSION_LOADED` says whether me_kernels._C was imported; `extension_error` says why not. A
missing extension (not built, or ME_DISABLE_EXT=1) is a fallback: the ops it would define are
defined in Python by me_kernels._ops with the torch references. A broken build (an ABI mismatch
such as "undefined symbol", or a missing shared library) is raised, never hidden behind the
fallback.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

__all__ = ["EXTENSION_LOADED", "extension_error", "warn_fallback_once", "op_is_defined"]


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


def op_is_defined(name: str) -> bool:
    """Whether the operator `me::<name>` has a schema already (defined by the extension, or by an
    earlier Python registration)."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"me::{name}", "")
    except RuntimeError:
        return False
    return True


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
