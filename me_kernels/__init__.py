"""me_kernels: device kernels for mixture-model-like LLM ensembles.

Sampling, member selection and mixture kernels (Triton), the compiled grouped ops
(torch.ops.me.*, from me_kernels._C), and their torch references in me_kernels.reference.
CUDA tensors run the kernels; CPU tensors run the Triton interpreter when TRITON_INTERPRET=1,
else the torch reference path.
"""
from . import reference
from ._extension import EXTENSION_LOADED
from ._philox import STREAM_MEMBER, STREAM_MIXTURE, STREAM_TOKEN
from .grouped import group_rows, grouped_linear
from .params import SamplingParams
from .mixture import mixture_logprobs, mixture_sample, mixture_sample_thresholds
from .sampling import me_step, sample, sample_thresholds
from .selection import select_members

__all__ = [
    "EXTENSION_LOADED",
    "STREAM_MEMBER",
    "STREAM_MIXTURE",
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
]
__version__ = "0.1.0"
