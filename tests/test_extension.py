"""The compiled extension's loading rules and the torch.ops.me registration (issue: foundation)."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

import me_kernels
from me_kernels import _extension


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env)


def test_ops_registered_under_me_namespace():
    assert hasattr(torch.ops.me, "group_rows")
    assert hasattr(torch.ops.me, "grouped_linear")
    schema = str(torch.ops.me.grouped_linear.default._schema)
    assert "Tensor? bias=None" in schema


def test_extension_is_built_in_ci():
    # CI builds the CPU extension (`make setup`); a silent fallback there would leave the C++
    # dispatch untested.
    assert me_kernels.EXTENSION_LOADED, _extension.extension_error


def test_fallback_imports_and_warns_once():
    proc = _run_python(
        """
        import warnings, torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import me_kernels
            assert not me_kernels.EXTENSION_LOADED
            m = torch.tensor([1, 0, 1], dtype=torch.int32)
            x = torch.randn(3, 4); w = torch.randn(2, 5, 4)
            for _ in range(3):
                out = me_kernels.grouped_linear(x, m, w)
                order, offsets = me_kernels.group_rows(m, 2)
        try:
            me_kernels.grouped_linear(x, torch.tensor([0, 2, 1], dtype=torch.int32), w)
            raise AssertionError("out-of-range member id accepted on CPU")
        except ValueError as err:
            assert "members[1] = 2" in str(err), err
        ref = torch.stack([x[i] @ w[int(m[i])].T for i in range(3)])
        assert torch.allclose(out, ref, atol=1e-5)
        assert order.tolist() == [1, 0, 2] and offsets.tolist() == [0, 1, 3]
        msgs = [str(w.message) for w in caught if "compiled extension unavailable" in str(w.message)]
        print(len(msgs))
        """,
        ME_DISABLE_EXT="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_abi_error_is_raised_not_hidden(monkeypatch):
    real_import = importlib.import_module

    def broken_import(name, *args, **kwargs):
        if name == "me_kernels._C":
            raise ImportError("me_kernels/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken_import)
    monkeypatch.delenv("ME_DISABLE_EXT", raising=False)
    with pytest.raises(ImportError, match="undefined symbol.*rebuild"):
        _extension._load_extension()


def test_missing_extension_is_a_fallback(monkeypatch):
    real_import = importlib.import_module

    def missing_import(name, *args, **kwargs):
        if name == "me_kernels._C":
            raise ModuleNotFoundError("No module named 'me_kernels._C'", name="me_kernels._C")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", missing_import)
    monkeypatch.delenv("ME_DISABLE_EXT", raising=False)
    loaded, why = _extension._load_extension()
    assert not loaded and "not built" in why


@pytest.mark.parametrize("bias", [False, True])
def test_fake_implementations_agree(bias):
    x = torch.randn(5, 8)
    members = torch.tensor([0, 2, 1, 2, 0], dtype=torch.int32)
    weight = torch.randn(3, 6, 8)
    b = torch.randn(3, 6) if bias else None
    torch.library.opcheck(torch.ops.me.grouped_linear.default, (x, members, weight, b))
    torch.library.opcheck(torch.ops.me.group_rows.default, (members, 3))


# The schemas the C++ CPU kernels of the sampling ops implement, byte for byte: the extension may
# define these ops itself, and Python then only adds the CUDA launchers and the fake kernels.
SAMPLING_SCHEMAS = {
    "sample": "sample(Tensor logits, Tensor? temp_t, float temp_s, Tensor? topk_t, int topk_s, Tensor? topp_t, float topp_s, Tensor? minp_t, float minp_s, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s) -> Tensor",
    "me_step": "me_step(Tensor logits, Tensor weights, Tensor? temp_t, float temp_s, Tensor? topk_t, int topk_s, Tensor? topp_t, float topp_s, Tensor? minp_t, float minp_s, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s, bool shared) -> (Tensor, Tensor)",
    "select_members": "select_members(Tensor weights, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s, int batch) -> Tensor",
    "mixture_sample": "mixture_sample(Tensor logits, Tensor weights, Tensor? temp_t, float temp_s, Tensor? topk_t, int topk_s, Tensor? topp_t, float topp_s, Tensor? minp_t, float minp_s, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s) -> Tensor",
    "mixture_logprobs": "mixture_logprobs(Tensor logits, Tensor weights) -> Tensor",
}


def test_schemas_are_written_once_and_registered_as_written():
    from me_kernels._ops import SCHEMAS

    for name, schema in SAMPLING_SCHEMAS.items():
        assert SCHEMAS[name] == schema
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.me, name).default._schema) == f"me::{schema}"


def test_every_op_has_a_cpu_and_a_cuda_implementation():
    for name in SAMPLING_SCHEMAS:
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"me::{name}", key), (name, key)


def test_python_defines_the_ops_the_extension_lacks():
    # Without the extension every op is defined in Python (CPU: the torch reference); the same
    # registrations then serve the sampling ops, traced by torch.compile.
    proc = _run_python(
        """
        import warnings, torch
        warnings.simplefilter("ignore")
        import me_kernels
        from me_kernels import reference as R
        assert not me_kernels.EXTENSION_LOADED
        x = torch.randn(3, 50); s = torch.arange(3)
        assert torch.equal(me_kernels.sample(x, seed=s, top_p=0.9), R.sample_reference(x, seed=s, top_p=0.9))
        step = torch.compile(lambda x, s: me_kernels.sample(x, seed=s, top_k=5) + 1, fullgraph=True, backend="aot_eager")
        assert torch.equal(step(x, s) - 1, R.sample_reference(x, seed=s, top_k=5))
        print("ok")
        """,
        ME_DISABLE_EXT="1",
        TRITON_INTERPRET="0",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("name", list(SAMPLING_SCHEMAS))
def test_sampling_ops_fake_implementations_agree(name):
    x, s = torch.randn(3, 50), torch.arange(3)
    row = (None, 1.0, None, 0, None, 0.9, None, 0.0, s, 0, None, 3)
    args = {
        "sample": (x, *row),
        "me_step": (x, torch.ones(2), *row, False),
        "select_members": (torch.ones(2), s, 0, None, 3, 3),
        "mixture_sample": (torch.randn(2, 3, 50), torch.ones(2), *row),
        "mixture_logprobs": (torch.randn(2, 3, 50), torch.ones(2)),
    }[name]
    torch.library.opcheck(getattr(torch.ops.me, name).default, args)
