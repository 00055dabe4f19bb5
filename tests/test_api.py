"""The public API of me_kernels: every public function is annotated and documented with shapes and
an example, and the names the runtime and the tests rely on are exported."""
from __future__ import annotations

import inspect

import me_kernels

FUNCTIONS = ["sample", "me_step", "select_members", "mixture_sample", "mixture_logprobs", "grouped_linear",
             "group_rows", "verify_draft", "sample_thresholds", "mixture_sample_thresholds"]
OPS_WITH_TEST_AND_BENCH = FUNCTIONS[:8]


def test_exports():
    for name in FUNCTIONS + ["SamplingParams", "EXTENSION_LOADED", "STREAM_TOKEN", "STREAM_MEMBER", "STREAM_MIXTURE",
                             "STREAM_ACCEPT", "STREAM_RESIDUAL", "reference"]:
        assert name in me_kernels.__all__ and hasattr(me_kernels, name), name


def test_public_functions_are_annotated_and_have_an_example():
    for name in FUNCTIONS:
        fn = getattr(me_kernels, name)
        sig = inspect.signature(fn)
        missing = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty]
        assert not missing, (name, missing)
        assert sig.return_annotation is not inspect.Signature.empty, name
        doc = inspect.getdoc(fn)
        assert "Example::" in doc and ">>> " in doc, name
    assert "Example::" in inspect.getdoc(me_kernels.SamplingParams)


def test_the_package_docstring_has_the_op_table():
    doc = me_kernels.__doc__
    for op in OPS_WITH_TEST_AND_BENCH:
        assert f"tests/test_{op}.py" in doc and f"bench/bench_{op}.py" in doc, op
