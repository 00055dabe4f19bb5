"""me_kernels: device kernels for mixture-model-like LLM ensembles.

Sampling, member selection and mixture kernels (Triton), the compiled grouped ops
(torch.ops.me.*, from me_kernels._C), and their torch references in me_kernels.reference.
CUDA tensors run the kernels; CPU tensors run the Triton interpreter when TRITON_INTERPRET=1,
else the registered op's CPU implementation (the compiled CPU kernel when the extension defines
one, else the torch reference). Every op is registered as torch.ops.me.<op> (me_kernels._ops
holds the schemas), so torch.compile traces it.

=================  ======================================  ===============================  ===============================  ===============================
op                 kernel                                  reference (me_kernels.reference)  test                             benchmark
=================  ======================================  ===============================  ===============================  ===============================
sample             sampling._sample_kernel (SELECT=False)  sample_reference                 tests/test_sample.py             bench/bench_sample.py
me_step            sampling._sample_kernel (SELECT=True)   me_step_reference                tests/test_me_step.py            bench/bench_me_step.py
select_members     selection._select_members_kernel        select_members_reference         tests/test_select_members.py     bench/bench_select_members.py
mixture_sample     mixture._mixture_partials_kernel +      mixture_sample_reference         tests/test_mixture_sample.py     bench/bench_mixture_sample.py
                   mixture._mixture_sample_kernel
mixture_logprobs   mixture._mixture_partials_kernel +      mixture_logprobs_reference       tests/test_mixture_logprobs.py   bench/bench_mixture_logprobs.py
                   mixture._mixture_logprobs_kernel
verify_draft       mixture_logprobs + sample thresholds +  verify_draft_reference           tests/test_verify_draft.py       bench/bench_verify_draft.py
                   verify._verify_position_kernel +
                   verify._verify_combine_kernel
grouped_linear     csrc/ (me_kernels._C, CUDA and C++)     grouped_linear_reference         tests/test_grouped_linear.py     bench/bench_grouped_linear.py
group_rows         csrc/ (me_kernels._C, CUDA and C++)     group_rows_reference             tests/test_group_rows.py         bench/bench_group_rows.py
=================  ======================================  ===============================  ===============================  ===============================

The sampling ops also have compiled CPU kernels (csrc/cpu/sampling_cpu.cpp, the CPU path when
the extension is built): they draw the reference's tokens exactly, tested for every op in
tests/test_cpu_kernels.py and timed against the reference by bench/bench_cpu_kernels.py.
verify_draft (exact CE by drafting: speculative acceptance of drafted tokens against the mixture,
Philox streams STREAM_ACCEPT / STREAM_RESIDUAL) has no compiled CPU kernel: its CPU path is the
torch reference.

The sampling kernels share the row pipeline of me_kernels._rows (design in its docstring; passes
in _row_passes, register-level threshold search in _row_search) and the Philox streams of
_random (Triton) / _philox (torch). Arguments are validated by me_kernels._validate with the
rules of me_kernels.params (`SamplingParams`). Debug entries: `sample_thresholds`,
`mixture_sample_thresholds` (the thresholds and pass counts the kernels found).

Example::

    >>> import me_kernels as mk
    >>> tokens = mk.sample(logits, temperature=0.7, top_p=0.9, seed=seeds, offset=step)
    >>> tokens, next_members = mk.me_step(logits, weights, top_p=0.9, seed=seeds, offset=step)
"""
from . import reference
from ._extension import EXTENSION_LOADED
from ._philox import STREAM_ACCEPT, STREAM_MEMBER, STREAM_MIXTURE, STREAM_RESIDUAL, STREAM_TOKEN
from .grouped import group_rows, grouped_linear
from .mixture import mixture_logprobs, mixture_sample, mixture_sample_thresholds
from .params import SamplingParams
from .sampling import me_step, sample, sample_thresholds
from .selection import select_members
from .verify import verify_draft

__all__ = [
    "EXTENSION_LOADED",
    "STREAM_ACCEPT",
    "STREAM_MEMBER",
    "STREAM_MIXTURE",
    "STREAM_RESIDUAL",
    "STREAM_TOKEN",
    "SamplingParams",
    "group_rows",
    "grouped_linear",
    "me_step",
    "mixture_logprobs",
    "mixture_sample",
    "mixture_sample_thresholds",
    "reference",
    "sample",
    "sample_thresholds",
    "select_members",
    "verify_draft",
]
__version__ = "0.1.0"
